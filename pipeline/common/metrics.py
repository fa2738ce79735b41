"""Per-class segmentation metrics of label maps (MONAI's Dice and 95th percentile Hausdorff).

Pure functions: integer label arrays in, numbers out. Each foreground class is scored as one
binary mask pair, so memory stays at two float volumes whatever the number of classes.

Empty masks (MONAI's `ignore_empty=True` semantics, written down):
- Dice is NaN when the reference has none of the class (whatever the prediction holds): such a
  case says nothing about that class and is left out of means (`nanmean`).
- HD95 is NaN when either mask is empty (a distance needs two surfaces); the voxel counts kept
  next to it show whether the class was missed or hallucinated.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


@dataclass(frozen=True)
class ClassMetrics:
    class_id: int
    name: str
    dice: float
    hd95: float  # in the units of `spacing` (mm)
    reference_voxels: int
    predicted_voxels: int


def _masks(prediction: np.ndarray, reference: np.ndarray, class_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary (1, 1, *shape) float masks of one class, as MONAI's metrics take them."""
    return _mask(prediction, class_id), _mask(reference, class_id)


def _mask(labels: np.ndarray, class_id: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(labels) == class_id)[None, None].float()


def metric_name(text: str) -> str:
    """A task or class name as an MLflow metric path component (and a file name part)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text.strip()) or "_"


def dice(prediction: np.ndarray, reference: np.ndarray, class_id: int) -> float:
    """Dice of one class; NaN when the reference has no voxel of it."""
    predicted, expected = _masks(prediction, reference, class_id)
    return float(compute_dice(predicted, expected, include_background=True, ignore_empty=True))


def hd95(prediction: np.ndarray, reference: np.ndarray, class_id: int, spacing: Sequence[float]) -> float:
    """95th percentile symmetric Hausdorff distance of one class in mm; NaN when a mask is empty."""
    predicted, expected = _masks(prediction, reference, class_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks; the NaN rule is documented above
        distance = compute_hausdorff_distance(
            predicted, expected, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
        )
    return float(distance)


def class_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    labels: Mapping[int, str],
    spacing: Sequence[float],
) -> list[ClassMetrics]:
    """Dice, HD95 and voxel counts of every foreground class of `labels` (id -> name)."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} != reference shape {reference.shape}")
    if len(spacing) != prediction.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {prediction.ndim}D array")
    return [
        ClassMetrics(
            class_id=class_id,
            name=name,
            dice=dice(prediction, reference, class_id),
            hd95=hd95(prediction, reference, class_id, spacing),
            reference_voxels=int(np.count_nonzero(reference == class_id)),
            predicted_voxels=int(np.count_nonzero(prediction == class_id)),
        )
        for class_id, name in sorted(labels.items())
        if class_id != 0
    ]
