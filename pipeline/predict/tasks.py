"""Which of the model's tasks run on a scan, and how several tasks' label maps merge into one.

`--task` names a task or gives its id (0-based, the card's order, as the UniSeg reference code's
`-task_id`). `--task all` runs every task whose modalities, as `--modality` names the scan's channels
(compared case-insensitively), match the scan's: channel count alone would run, say, an MR
prostate task on a 2-channel CT+PET scan, so `all` needs `--modality`. Merged maps number the
classes task after task in the card's order (task 1's classes 1..n1-1, task 2's from n1 on,
...); where several tasks predict foreground, the voxel goes to the task most confident that it
is foreground (largest 1 - P(background)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.common.inference import ScanPrediction
from pipeline.common.model_card import ModelCard, TaskCard
from pipeline.predict.io import PredictError, Scan

ALL_TASKS = "all"


def select_tasks(card: ModelCard, task: str, scan: Scan, modalities: Sequence[str] = ()) -> tuple[int, ...]:
    """Task ids to run on `scan`; raises PredictError naming the scan when none can run."""
    if modalities and len(modalities) != scan.num_channels:
        raise PredictError(
            f"{scan.name}: --modality names {len(modalities)} channel(s) but the scan has {scan.num_channels}"
        )
    if task != ALL_TASKS:
        task_id = task_index(card, task)
        problem = mismatch(card.tasks[task_id], scan.num_channels, modalities)
        if problem:
            raise PredictError(f"{scan.name}: {problem}")
        return (task_id,)
    matching = tuple(i for i, t in enumerate(card.tasks) if mismatch(t, scan.num_channels, modalities) is None)
    if not matching:
        known = "; ".join(f"{t.name} ({', '.join(t.modalities)})" for t in card.tasks)
        raise PredictError(
            f"{scan.name}: no task of this model takes {_describe(scan.num_channels, modalities)}; it knows {known}"
        )
    return matching


def task_index(card: ModelCard, task: str) -> int:
    """The id of `task`: a task name of the model, or a task id (its place in the card, 0-based, as the
    UniSeg reference code's `-task_id` counts: `--task 7` is an imported reference model's vertebrae)."""
    names = [t.name for t in card.tasks]
    if task not in names and task.isdigit():
        if int(task) < len(names):
            return int(task)
        known = ", ".join(f"{i}={n}" for i, n in enumerate(names))
        raise PredictError(f"--task {task}: unknown task id; this model knows {known} (or 'all')")
    try:
        return card.task_index(task)
    except ValueError as err:
        raise PredictError(f"--task {task}: {err} (or 'all')") from None


def mismatch(task: TaskCard, num_channels: int, modalities: Sequence[str]) -> str | None:
    """Why `task` cannot take this input, or None when it can."""
    if num_channels != task.in_channels:
        needs = f"{task.in_channels} ({', '.join(task.modalities)})"
        return f"{num_channels} channel(s), but task {task.name} needs {needs}"
    if modalities and [m.upper() for m in modalities] != [m.upper() for m in task.modalities]:
        return f"modalities {', '.join(modalities)}, but task {task.name} needs {', '.join(task.modalities)}"
    return None


def _describe(num_channels: int, modalities: Sequence[str]) -> str:
    return f"{num_channels} channel(s)" + (f" of {', '.join(modalities)}" if modalities else "")


def label_table(card: ModelCard, task_ids: Sequence[int]) -> dict[int, str]:
    """Label id -> name of the output map: the task's own labels, or "task/label" when merged."""
    if len(task_ids) == 1:
        return dict(card.tasks[task_ids[0]].labels)
    table = {0: "background"}
    for task_id in task_ids:
        task = card.tasks[task_id]
        offset = len(table) - 1
        table.update({offset + c: f"{task.name}/{name}" for c, name in task.labels.items() if c > 0})
    return table


def merge_predictions(card: ModelCard, task_ids: Sequence[int], predictions: Sequence[ScanPrediction]) -> np.ndarray:
    """One label map from several tasks' predictions (numbering and rule in the module doc)."""
    total = sum(card.tasks[i].num_classes - 1 for i in task_ids) + 1
    merged = np.zeros(predictions[0].labels.shape, dtype=np.uint8 if total <= 256 else np.uint16)
    confidence = np.full(merged.shape, -1.0, dtype=np.float32)
    offset = 0
    for task_id, prediction in zip(task_ids, predictions):
        wins = (prediction.labels > 0) & (prediction.foreground > confidence)
        merged[wins] = prediction.labels[wins].astype(merged.dtype) + offset
        confidence[wins] = prediction.foreground[wins]
        offset += card.tasks[task_id].num_classes - 1
    return merged
