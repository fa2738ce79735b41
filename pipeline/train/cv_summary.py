"""The cross-validation summary: per task and class, Dice over the folds and over all out-of-fold cases.

Input: one row per (fold, task, held-out case, class) with that case's Dice, scored by the fold
that held it out (`pipeline.common.metrics`, nnU-Net's empty-reference rule). Per task and class:
- `fold_dice`: each fold's mean Dice over its held-out cases (NaN left out; NaN for a fold with
  no defined value, e.g. a store with fewer folds);
- `mean` and `std` over the folds that have a value (sample std, ddof=1; NaN with one fold);
- `pooled`: the mean Dice over all out-of-fold cases together (each labelled case once; as
  nnU-Net's summary of its cross-validation predictions), and `cases` counts them.
A task's "mean" row averages its classes fold by fold (then mean and std over folds) and its
classes' pooled values. Written as cv_summary.csv, cv_summary.md and cv_summary.png.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common.summary import (
    TASK_MEAN, ClassRow, fmt, markdown_table, mean, metric_dict, per_task, spread, task_rows, write_csv_rows,
)

CSV_FILE = "cv_summary.csv"
MARKDOWN_FILE = "cv_summary.md"
PLOT_FILE = "cv_summary.png"


@dataclass(frozen=True)
class OutOfFoldRow:
    """One held-out case and class, scored by the fold that held it out."""

    fold: int
    task: str
    case: str
    class_id: int
    name: str
    dice: float
    false_positives: int
    false_negatives: int


@dataclass(frozen=True)
class CvRow(ClassRow):
    fold_dice: tuple[float, ...]  # per fold of `folds`, in order
    mean: float
    std: float
    pooled: float
    cases: int


def summarise(rows: Sequence[OutOfFoldRow], folds: Sequence[int]) -> list[CvRow]:
    """Per task: a row per class (in class order), then the task's mean row."""
    def class_row(task: str, class_id: int, name: str, mine: list[OutOfFoldRow]) -> CvRow:
        fold_dice = tuple(mean(r.dice for r in mine if r.fold == fold) for fold in folds)
        over_folds, pooled = spread(fold_dice, ddof=1), spread(r.dice for r in mine)
        return CvRow(task, class_id, name, fold_dice, over_folds.mean, over_folds.std, pooled.mean, pooled.n)

    def task_row(task: str, classes: list[CvRow]) -> CvRow:
        fold_dice = tuple(mean(c.fold_dice[i] for c in classes) for i in range(len(folds)))
        over_folds = spread(fold_dice, ddof=1)
        return CvRow(task, None, TASK_MEAN, fold_dice, over_folds.mean, over_folds.std, mean(c.pooled for c in classes),
                     max(c.cases for c in classes))

    return per_task(rows, lambda r: (r.task, r.class_id, r.name), class_row, task_row)


def overall(summary: Sequence[CvRow]) -> tuple[float, float, float]:
    """(mean, std) over folds of the mean Dice over tasks, and the mean of the tasks' pooled Dice."""
    tasks = task_rows(summary)
    if not tasks:
        return math.nan, math.nan, math.nan
    over_folds = spread((mean(t.fold_dice[i] for t in tasks) for i in range(len(tasks[0].fold_dice))), ddof=1)
    return over_folds.mean, over_folds.std, mean(t.pooled for t in tasks)


def mlflow_metrics(summary: Sequence[CvRow]) -> dict[str, float]:
    """`cv/<task>[/<class>]/dice_{mean,std,pooled}` and `cv/dice_{mean,std,pooled}` (finite values)."""
    dice_mean, dice_std, dice_pooled = overall(summary)
    return metric_dict("cv", {"dice_mean": dice_mean, "dice_std": dice_std, "dice_pooled": dice_pooled}, summary,
                       lambda r: {"dice_mean": r.mean, "dice_std": r.std, "dice_pooled": r.pooled})


def markdown(summary: Sequence[CvRow], folds: Sequence[int], title: str, notes: Sequence[str] = ()) -> str:
    header = ["task", "class", *(f"fold {f}" for f in folds), "mean", "std", "pooled", "cases"]
    lines = markdown_table(title, header, ([r.task, r.label(), *map(fmt, r.fold_dice), fmt(r.mean), fmt(r.std),
                                            fmt(r.pooled), r.cases] for r in summary))
    dice_mean, dice_std, dice_pooled = overall(summary)
    lines += ["", f"Mean Dice over tasks: {fmt(dice_mean)} +- {fmt(dice_std)} (std over {len(folds)} folds); "
                  f"pooled over all out-of-fold cases: {fmt(dice_pooled)}", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    return "\n".join(lines)


def write_csv(summary: Sequence[CvRow], folds: Sequence[int], path: Path) -> Path:
    header = ["task", "class_id", "name", *(f"fold_{f}" for f in folds), "mean", "std", "pooled", "cases"]
    return write_csv_rows(path, header, ([r.task, "" if r.class_id is None else r.class_id, r.name, *r.fold_dice,
                                       r.mean, r.std, r.pooled, r.cases] for r in summary))


def plot(summary: Sequence[CvRow], folds: Sequence[int], path: Path) -> Path:
    """Per task and class: mean over folds (bar) +- std (error bar), each fold (dots), pooled (diamond)."""
    from matplotlib.figure import Figure

    rows = [r for r in summary if r.class_id is not None]
    fig = Figure(figsize=(max(5.0, 0.9 * len(rows) + 2), 4.5))
    ax = fig.subplots()
    x = np.arange(len(rows))
    ax.bar(x, [0 if math.isnan(r.mean) else r.mean for r in rows], color="#9ecae1", label="mean over folds")
    ax.errorbar(x, [r.mean for r in rows], yerr=[0 if math.isnan(r.std) else r.std for r in rows], fmt="none",
                ecolor="black", capsize=4, label="std over folds")
    for i, fold in enumerate(folds):
        ax.scatter(x + (i - (len(folds) - 1) / 2) * 0.08, [r.fold_dice[i] for r in rows], s=14, zorder=3,
                   label=f"fold {fold}")
    ax.scatter(x, [r.pooled for r in rows], marker="D", color="black", s=26, zorder=4, label="pooled")
    ax.set_xticks(x, [f"{r.task}\n{r.name}" for r in rows], fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice (held-out cases)")
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_summary(summary: Sequence[CvRow], folds: Sequence[int], folder: Path, title: str,
                  notes: Sequence[str] = ()) -> list[Path]:
    """cv_summary.csv, cv_summary.md and cv_summary.png into `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKDOWN_FILE).write_text(markdown(summary, folds, title, notes))
    return [write_csv(summary, folds, folder / CSV_FILE), folder / MARKDOWN_FILE, plot(summary, folds, folder / PLOT_FILE)]
