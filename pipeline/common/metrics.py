"""Per-class segmentation metrics of label maps (Dice, MONAI's 95th percentile Hausdorff, voxel counts).

Pure functions: integer label arrays in, numbers out. Each foreground class is scored as one
binary mask pair, so memory stays at two float volumes whatever the number of classes. Dice is
2 TP / (|prediction| + |reference|) from voxel counts (equal to MONAI's compute_dice on binary
masks).

Empty references, two rules (`EmptyRule`), written down:
- "nnunet" (the default, as nnU-Net's evaluation): Dice is 0 when the reference has none of the
  class but the prediction has some (false positives count), NaN only when both are empty;
- "monai" (`ignore_empty=True`): Dice is NaN whenever the reference has none of the class,
  whatever the prediction holds.
NaN values say nothing about the class and are left out of means (`nanmean`). HD95 is NaN when
either mask is empty (a distance needs two surfaces); the false positive and negative voxel
counts kept next to it show whether the class was missed or hallucinated.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

EmptyRule = Literal["nnunet", "monai"]
EMPTY_RULES: tuple[str, ...] = ("nnunet", "monai")


@dataclass(frozen=True)
class ClassMetrics:
    class_id: int
    name: str
    dice: float
    hd95: float  # in the units of `spacing` (mm)
    reference_voxels: int
    predicted_voxels: int
    false_positives: int  # predicted voxels of the class outside the reference's
    false_negatives: int  # reference voxels of the class the prediction missed


def _masks(prediction: np.ndarray, reference: np.ndarray, class_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary (1, 1, *shape) float masks of one class, as MONAI's metrics take them."""
    return _mask(prediction, class_id), _mask(reference, class_id)


def _mask(labels: np.ndarray, class_id: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(labels) == class_id)[None, None].float()


def metric_name(text: str) -> str:
    """A task or class name as an MLflow metric path component (and a file name part)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text.strip()) or "_"


def dice(prediction: np.ndarray, reference: np.ndarray, class_id: int, empty: EmptyRule = "nnunet") -> float:
    """Dice of one class, with the module docstring's rule for a reference without the class."""
    predicted, expected = np.asarray(prediction) == class_id, np.asarray(reference) == class_id
    return dice_from_counts(int(np.count_nonzero(predicted & expected)), int(np.count_nonzero(predicted)),
                            int(np.count_nonzero(expected)), empty)


def dice_from_counts(true_positives: int, predicted: int, reference: int, empty: EmptyRule = "nnunet") -> float:
    """2 TP / (predicted + reference) voxels; an empty reference by `empty` (module docstring)."""
    if empty not in EMPTY_RULES:
        raise ValueError(f"empty-reference rule must be one of {EMPTY_RULES}, got {empty!r}")
    if reference == 0 and (predicted == 0 or empty == "monai"):
        return math.nan
    return 2.0 * true_positives / (predicted + reference)


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
    empty: EmptyRule = "nnunet",
) -> list[ClassMetrics]:
    """Dice (with the `empty` rule), HD95 and voxel counts of every foreground class of `labels`
    (id -> name)."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} != reference shape {reference.shape}")
    if len(spacing) != prediction.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {prediction.ndim}D array")
    return [_one_class(prediction, reference, class_id, name, spacing, empty)
            for class_id, name in sorted(labels.items()) if class_id != 0]


def _one_class(prediction: np.ndarray, reference: np.ndarray, class_id: int, name: str, spacing: Sequence[float],
               empty: EmptyRule) -> ClassMetrics:
    predicted, expected = prediction == class_id, reference == class_id
    true_positives = int(np.count_nonzero(predicted & expected))
    n_predicted, n_reference = int(np.count_nonzero(predicted)), int(np.count_nonzero(expected))
    return ClassMetrics(
        class_id=class_id,
        name=name,
        dice=dice_from_counts(true_positives, n_predicted, n_reference, empty),
        hd95=hd95(prediction, reference, class_id, spacing) if n_predicted and n_reference else math.nan,
        reference_voxels=n_reference,
        predicted_voxels=n_predicted,
        false_positives=n_predicted - true_positives,
        false_negatives=n_reference - true_positives,
    )
