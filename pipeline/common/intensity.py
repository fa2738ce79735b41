"""Intensity normalisation per channel: the scheme is planned once per dataset, applied per case.

Schemes (nnU-Net names in brackets):
- ``ct-clip-zscore`` [CTNormalization]: clip to the dataset's foreground 0.5/99.5 percentiles,
  then subtract the foreground mean and divide by its std (statistics from the plan pass).
- ``ct-window`` (UniSeg): clip to the fixed window [-325, 325] HU and scale it to [0, 1].
- ``zscore`` [ZScoreNormalization with mask]: per case, mean and std over the nonzero mask;
  voxels outside the mask are set to 0. Used for MR and PET.

Pure functions: arrays in, arrays out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Scheme = Literal["ct-clip-zscore", "ct-window", "zscore"]
CT_WINDOW = (-325.0, 325.0)
_MIN_STD = 1e-8


@dataclass(frozen=True)
class IntensityStats:
    """Foreground intensity statistics of one channel over a whole dataset (nnU-Net fingerprint)."""

    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass(frozen=True)
class ChannelNormalization:
    """How one channel is normalised; `lower`/`upper` clip, `mean`/`std` are dataset constants."""

    scheme: Scheme
    lower: float | None = None
    upper: float | None = None
    mean: float | None = None
    std: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ChannelNormalization:
        return cls(**raw)


def ct_window() -> ChannelNormalization:
    """UniSeg's fixed CT window [-325, 325] HU scaled to [0, 1]."""
    return ChannelNormalization("ct-window", lower=CT_WINDOW[0], upper=CT_WINDOW[1])


def ct_clip_zscore(stats: IntensityStats) -> ChannelNormalization:
    """nnU-Net's CT normalisation from dataset foreground statistics."""
    return ChannelNormalization(
        "ct-clip-zscore",
        lower=stats.percentile_00_5,
        upper=stats.percentile_99_5,
        mean=stats.mean,
        std=stats.std,
    )


def zscore() -> ChannelNormalization:
    return ChannelNormalization("zscore")


def sample_foreground(channel: np.ndarray, label: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `count` random intensities of `channel` where `label > 0` (float64, 1-D)."""
    values = channel[label > 0]
    if values.size > count:
        values = rng.choice(values, size=count, replace=False)
    return values.astype(np.float64)


def intensity_stats(samples: np.ndarray) -> IntensityStats:
    """Statistics of pooled foreground samples; raises ValueError when there are none."""
    if samples.size == 0:
        raise ValueError("no foreground voxels to compute intensity statistics from")
    low, high = np.percentile(samples, [0.5, 99.5])
    return IntensityStats(float(samples.mean()), float(samples.std()), float(low), float(high))


def normalize(image: np.ndarray, norms: tuple[ChannelNormalization, ...], mask: np.ndarray) -> np.ndarray:
    """Normalise (C, ...) `image` channel by channel; `mask` marks the nonzero region (zscore)."""
    if image.shape[0] != len(norms):
        raise ValueError(f"image has {image.shape[0]} channels but {len(norms)} normalisations were given")
    return np.stack([normalize_channel(channel, norm, mask) for channel, norm in zip(image, norms)])


def normalize_channel(channel: np.ndarray, norm: ChannelNormalization, mask: np.ndarray) -> np.ndarray:
    """One channel as float32 according to `norm` (see the module docstring)."""
    data = channel.astype(np.float32)
    if norm.scheme == "ct-window":
        return (np.clip(data, norm.lower, norm.upper) - norm.lower) / (norm.upper - norm.lower)
    if norm.scheme == "ct-clip-zscore":
        return (np.clip(data, norm.lower, norm.upper) - norm.mean) / max(norm.std, _MIN_STD)
    if norm.scheme == "zscore":
        return _zscore_in_mask(data, mask)
    raise ValueError(f"unknown normalisation scheme {norm.scheme!r}")


def _zscore_in_mask(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    values = data[mask]
    if values.size == 0:
        return np.zeros_like(data)
    out = (data - values.mean()) / max(float(values.std()), _MIN_STD)
    out[~mask] = 0.0
    return out
