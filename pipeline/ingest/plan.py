"""The plan pass (nnU-Net's fingerprint + plan): per-case summaries reduced to one dataset plan.

`summarize_case` is the map step (one Dask task per training case), `make_plan` the reduction:
target spacing (median, nnU-Net's rule for anisotropic data, or given) and per-channel
normalisation (CT statistics from foreground voxels pooled over all cases).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.common import geometry, intensity
from pipeline.common.config import IngestConfig
from pipeline.common.intensity import ChannelNormalization
from pipeline.ingest.checks import load_case
from pipeline.ingest.dataset import CaseSource, DatasetSpec, case_rng

ANISOTROPY_THRESHOLD = 3.0
FOREGROUND_SAMPLES_PER_CASE = 10_000


@dataclass(frozen=True)
class CaseSummary:
    """What the plan needs from one case: (z, y, x) spacing, shape after cropping, CT samples."""

    case_id: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    foreground: tuple[np.ndarray | None, ...]  # per channel: sampled foreground intensities or None


@dataclass(frozen=True)
class Plan:
    """How every case of a dataset is preprocessed."""

    target_spacing: tuple[float, float, float]  # (z, y, x) mm
    normalization: tuple[ChannelNormalization, ...]
    image_order: int
    label_resampling: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_spacing": list(self.target_spacing),
            "normalization": [n.to_dict() for n in self.normalization],
            "image_order": self.image_order,
            "label_resampling": self.label_resampling,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Plan:
        return cls(
            tuple(raw["target_spacing"]),
            tuple(ChannelNormalization.from_dict(n) for n in raw["normalization"]),
            raw["image_order"],
            raw["label_resampling"],
        )

    @property
    def plan_id(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def is_ct(modality: str) -> bool:
    return modality.strip().upper() == "CT"


def needs_statistics(spec: DatasetSpec, cfg: IngestConfig) -> tuple[bool, ...]:
    """Per channel: does its normalisation need dataset foreground statistics?"""
    return tuple(is_ct(m) and cfg.ct_normalization == "nnunet" for m in spec.modalities)


def summarize_case(case: CaseSource, spec: DatasetSpec, statistics: tuple[bool, ...]) -> CaseSummary:
    """Map step: load and check a training case; raises checks.CaseError for a bad case."""
    loaded = load_case(case, len(spec.modalities), set(spec.labels))
    canonical = geometry.to_canonical(loaded.image, loaded.affine)
    box = geometry.bounding_box(geometry.nonzero_mask(canonical))
    rng = case_rng(case.case_id)
    samples = tuple(
        intensity.sample_foreground(channel, loaded.label, FOREGROUND_SAMPLES_PER_CASE, rng) if wanted else None
        for channel, wanted in zip(loaded.image, statistics)
    )
    shape = tuple(stop - start for start, stop in box)
    return CaseSummary(case.case_id, geometry.spacing_zyx(loaded.affine), shape, samples)


def make_plan(summaries: list[CaseSummary], spec: DatasetSpec, cfg: IngestConfig) -> Plan:
    """Reduction: the dataset plan from the summaries of all valid training cases."""
    if not summaries:
        raise ValueError(f"{spec.root}: no valid training case to plan from")
    if cfg.target_spacing is not None:
        spacing = tuple(float(s) for s in cfg.target_spacing)
    else:
        spacing = target_spacing([s.spacing for s in summaries], [s.shape for s in summaries])
    norms = tuple(_channel_normalization(spec, c, summaries, cfg) for c in range(len(spec.modalities)))
    return Plan(spacing, norms, cfg.image_order, cfg.label_resampling)


def target_spacing(spacings: list[tuple[float, ...]], shapes: list[tuple[int, ...]]) -> tuple[float, float, float]:
    """nnU-Net v2's full-resolution target spacing: the median, except that for clearly
    anisotropic data the coarse axis takes the 10th percentile of its spacings (but not finer
    than the other axes)."""
    target = np.percentile(np.asarray(spacings, dtype=np.float64), 50, axis=0)
    median_shape = np.percentile(np.asarray(shapes, dtype=np.float64), 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    aniso_voxels = median_shape[worst] * ANISOTROPY_THRESHOLD < min(median_shape[others])
    if aniso_spacing and aniso_voxels:
        coarse = np.percentile(np.asarray(spacings)[:, worst], 10)
        if coarse < max(target[others]):
            coarse = max(max(target[others]), coarse) + 1e-5
        target[worst] = coarse
    return tuple(float(t) for t in target)


def _channel_normalization(
    spec: DatasetSpec, channel: int, summaries: list[CaseSummary], cfg: IngestConfig
) -> ChannelNormalization:
    if not is_ct(spec.modalities[channel]):
        return intensity.zscore()
    if cfg.ct_normalization == "uniseg-window":
        return intensity.ct_window()
    pooled = [s.foreground[channel] for s in summaries if s.foreground[channel] is not None]
    return intensity.ct_clip_zscore(intensity.intensity_stats(np.concatenate(pooled)))
