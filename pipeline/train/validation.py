"""Validation during training: per-task, per-class Dice on each store's validation split.

Dice rule: the evaluate stage's (`pipeline.common.metrics.dice`, nnU-Net's): per case and class,
0 for false positives where the reference has none of the class, NaN only when neither has it,
and NaN values are left out of the means. Cases
are spread over ranks round-robin and the per-case values gathered, so every rank returns the
same summary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.common.inference import InferenceOptions, label_map, predict_probabilities
from pipeline.common.metrics import dice, metric_name
from pipeline.common.summary import TASK_MEAN, ClassRow, mean, per_task, task_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationTask:
    """One task to validate: its index in the network, class names and validation cases."""

    task_id: int
    name: str
    labels: Mapping[int, str]
    case_ids: tuple[str, ...]


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice of classes 1..num_classes-1; NaN where neither map has a class."""
    return [dice(prediction, truth, c) for c in range(1, num_classes)]


@dataclass(frozen=True)
class _Mean(ClassRow):
    dice: float


def summarise(per_case: Mapping[str, Sequence[Sequence[float]]], tasks: Sequence[ValidationTask]) -> dict[str, float]:
    """`dice/<task>/<class>`, `dice/<task>/mean` and `dice/mean` (mean over tasks) from per-case values."""
    scores = [(task.name, cls, task.labels[cls], value) for task in tasks for case in per_case.get(task.name, [])
              for cls, value in zip(sorted(c for c in task.labels if c != 0), case, strict=True)]
    rows = per_task(scores, key=lambda s: s[:3],
                    class_row=lambda task, cls, name, mine: _Mean(task, cls, name, mean(s[3] for s in mine)),
                    task_row=lambda task, classes: _Mean(task, None, TASK_MEAN, mean(c.dice for c in classes)))
    metrics = {f"dice/{metric_name(r.task)}/{metric_name(r.name)}": r.dice for r in rows}
    metrics["dice/mean"] = mean(r.dice for r in task_rows(rows))
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


CaseReader = Callable[[int, str], tuple[np.ndarray, np.ndarray]]


def validate(
    network: nn.Module,
    tasks: Sequence[ValidationTask],
    read_case: CaseReader,
    patch_size: Sequence[int],
    *,
    rank: int = 0,
    world_size: int = 1,
    amp_dtype: torch.dtype | None = None,
    overlap: float = 0.5,
) -> dict[str, float]:
    """Segment this rank's share of the validation cases and return the summary of all ranks.

    `read_case(task_id, case_id)` returns (image CZYX float32, label ZYX). The network must be
    the bare module (not DDP-wrapped); call it on every rank when world_size > 1. `amp_dtype` is
    the training step's autocast dtype (None: full precision), used on CUDA only.
    """
    options = InferenceOptions(overlap=overlap, amp=amp_dtype is not None, amp_dtype=amp_dtype or torch.float16)
    jobs = [(task, case) for task in tasks for case in task.case_ids]
    mine: dict[str, list[list[float]]] = {}
    was_training = network.training
    network.eval()
    for task, case in jobs[rank::world_size]:
        image, label = read_case(task.task_id, case)
        predicted = label_map(predict_probabilities(network, torch.as_tensor(np.asarray(image, np.float32)),
                                                    task.task_id, len(task.labels), patch_size, options))
        mine.setdefault(task.name, []).append(dice_per_class(predicted.cpu().numpy(), np.asarray(label), len(task.labels)))
    network.train(was_training)
    return summarise(_gather(mine, world_size), tasks)


def _gather(mine: dict[str, list[list[float]]], world_size: int) -> dict[str, list[list[float]]]:
    if world_size == 1 or not torch.distributed.is_initialized():
        return mine
    everyone: list[dict[str, list[list[float]]] | None] = [None] * world_size
    torch.distributed.all_gather_object(everyone, mine)
    merged: dict[str, list[list[float]]] = {}
    for part in everyone:
        for name, rows in (part or {}).items():
            merged.setdefault(name, []).extend(rows)
    return merged


def format_summary(metrics: Mapping[str, float]) -> str:
    """One short line per task for the job log."""
    parts = [f"{k.split('/')[1]} {v:.3f}" for k, v in sorted(metrics.items()) if k.endswith("/mean") and k != "dice/mean"]
    overall = metrics.get("dice/mean", math.nan)
    return f"mean Dice {overall:.3f} ({', '.join(parts)})"
