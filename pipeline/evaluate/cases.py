"""One store case: predict on its stored (preprocessed) image, score against its ground truth.

Spaces:
- "original" (default): the prediction is mapped back to the source file's voxel grid with the
  case's stored geometry (as `pipeline.predict` writes it) and scored against the source label
  file, HD95 in that file's voxel sizes. Figures match those of predict's NIfTI outputs.
- "store": scored against the stored (resampled) label on the store's grid and spacing.

The source label of a case is the last entry of its "source" attrs (images first, then label)
when the store holds a label for it; its paths are relative to the manifest's `source_root`,
or to `<raw_root>/<dataset>` when the raw data has moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import torch
from torch import nn

from pipeline.common.geometry import restore_probabilities
from pipeline.common.inference import InferenceOptions, label_map, predict_probabilities
from pipeline.common.metrics import ClassMetrics, EmptyRule, class_metrics
from pipeline.common.model_card import ModelCard
from pipeline.common.store import TaskStore
from pipeline.evaluate.slices import SliceExample, pick_slice

Space = Literal["original", "store"]


class EvaluateError(ValueError):
    """A model, store or case that cannot be evaluated; one line naming it."""


@dataclass(frozen=True)
class CaseResult:
    metrics: list[ClassMetrics]
    example: SliceExample | None  # on the store grid; None for a case without a stored label


@dataclass(frozen=True)
class Reference:
    labels: np.ndarray
    spacing: tuple[float, ...]  # of the axes of `labels`, mm


def evaluate_case(
    network: nn.Module,
    card: ModelCard,
    task_id: int,
    store: TaskStore,
    case_id: str,
    options: InferenceOptions,
    space: Space = "original",
    raw_root: Path | None = None,
    empty: EmptyRule = "nnunet",
) -> CaseResult:
    """Per-class Dice and HD95 of one case (see the module docstring for the space) and its
    example slice."""
    image, stored_label = store.read_case(case_id)
    task = card.tasks[task_id]
    volume = torch.from_numpy(np.asarray(image, np.float32))
    probabilities = predict_probabilities(network, volume, task_id, task.num_classes, card.spec.patch_size, options)
    predicted = label_map(probabilities).numpy()
    example = None if stored_label is None else pick_slice(case_id, image, stored_label, predicted)
    meta = store.case_meta(case_id)
    if space == "store":
        if stored_label is None:
            raise EvaluateError(f"{store.uri}: case {case_id} has no label (test cases have none)")
        return CaseResult(class_metrics(predicted, stored_label, task.labels, meta.spacing, empty), example)
    reference = original_reference(store, case_id, stored_label is not None, raw_root)
    restored, _ = restore_probabilities(probabilities.numpy(), meta)  # as predict: probabilities, then argmax
    if restored.shape != reference.labels.shape:
        raise EvaluateError(
            f"{store.uri}: case {case_id}: restored prediction {restored.shape} != label {reference.labels.shape}"
        )
    return CaseResult(class_metrics(restored, reference.labels, task.labels, reference.spacing, empty), example)


def original_reference(store: TaskStore, case_id: str, has_label: bool, raw_root: Path | None) -> Reference:
    """The case's source label file on its own grid, with its voxel sizes."""
    path = source_label_path(store, case_id, has_label, raw_root)
    if not path.is_file():
        raise EvaluateError(f"{path}: source label of case {case_id} not found (pass --raw-root if the raw data moved)")
    image = nib.load(path)
    labels = np.asanyarray(image.dataobj).astype(np.uint8)
    return Reference(labels, tuple(float(s) for s in nib.affines.voxel_sizes(image.affine)))


def source_label_path(store: TaskStore, case_id: str, has_label: bool, raw_root: Path | None) -> Path:
    manifest = store.manifest
    if not has_label:
        raise EvaluateError(f"{store.uri}: case {case_id} has no ground truth (test cases have one only when the source had labelsTs/)")
    source = store.case_sources(case_id)
    root = raw_root / manifest.dataset if raw_root is not None else Path(manifest.source_root)
    return root / source[-1]
