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

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common.metrics import metric_name

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
class CvRow:
    task: str
    class_id: int | None  # None: the task's mean over its classes
    name: str
    fold_dice: tuple[float, ...]  # per fold of `folds`, in order
    mean: float
    std: float
    pooled: float
    cases: int


def summarise(rows: Sequence[OutOfFoldRow], folds: Sequence[int]) -> list[CvRow]:
    """Per task: a row per class (in class order), then the task's mean row."""
    summary = []
    for task in dict.fromkeys(r.task for r in rows):
        mine = [r for r in rows if r.task == task]
        classes = sorted({(r.class_id, r.name) for r in mine})
        per_class = [_class_row(task, cid, name, [r for r in mine if r.class_id == cid], folds) for cid, name in classes]
        summary += per_class
        fold_dice = tuple(_nanmean([c.fold_dice[i] for c in per_class]) for i in range(len(folds)))
        summary.append(CvRow(task, None, "mean", fold_dice, *_spread(fold_dice),
                             _nanmean([c.pooled for c in per_class]), max(c.cases for c in per_class)))
    return summary


def _class_row(task: str, class_id: int, name: str, rows: Sequence[OutOfFoldRow], folds: Sequence[int]) -> CvRow:
    fold_dice = tuple(_nanmean([r.dice for r in rows if r.fold == fold]) for fold in folds)
    defined = [r.dice for r in rows if math.isfinite(r.dice)]
    return CvRow(task, class_id, name, fold_dice, *_spread(fold_dice), _nanmean(defined), len(defined))


def _spread(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else math.nan
    return mean, float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def overall(summary: Sequence[CvRow]) -> tuple[float, float, float]:
    """(mean, std) over folds of the mean Dice over tasks, and the mean of the tasks' pooled Dice."""
    tasks = [r for r in summary if r.class_id is None]
    if not tasks:
        return math.nan, math.nan, math.nan
    per_fold = tuple(_nanmean([t.fold_dice[i] for t in tasks]) for i in range(len(tasks[0].fold_dice)))
    return *_spread(per_fold), _nanmean([t.pooled for t in tasks])


def mlflow_metrics(summary: Sequence[CvRow]) -> dict[str, float]:
    """`cv/<task>[/<class>]/dice_{mean,std,pooled}` and `cv/dice_{mean,std,pooled}` (finite values)."""
    mean, std, pooled = overall(summary)
    metrics = {"cv/dice_mean": mean, "cv/dice_std": std, "cv/dice_pooled": pooled}
    for row in summary:
        prefix = f"cv/{metric_name(row.task)}" + ("" if row.class_id is None else f"/{metric_name(row.name)}")
        metrics |= {f"{prefix}/dice_mean": row.mean, f"{prefix}/dice_std": row.std, f"{prefix}/dice_pooled": row.pooled}
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def markdown(summary: Sequence[CvRow], folds: Sequence[int], title: str, notes: Sequence[str] = ()) -> str:
    fold_heads = " | ".join(f"fold {f}" for f in folds)
    lines = [f"# {title}", "", f"| task | class | {fold_heads} | mean | std | pooled | cases |",
             "|---|---|" + "---:|" * (len(folds) + 4)]
    for row in summary:
        name = f"**{row.name}**" if row.class_id is None else f"{row.class_id} {row.name}"
        per_fold = " | ".join(_fmt(v) for v in row.fold_dice)
        lines.append(f"| {row.task} | {name} | {per_fold} | {_fmt(row.mean)} | {_fmt(row.std)} | "
                     f"{_fmt(row.pooled)} | {row.cases} |")
    mean, std, pooled = overall(summary)
    lines += ["", f"Mean Dice over tasks: {_fmt(mean)} +- {_fmt(std)} (std over {len(folds)} folds); "
                  f"pooled over all out-of-fold cases: {_fmt(pooled)}", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def write_csv(summary: Sequence[CvRow], folds: Sequence[int], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "class_id", "name", *(f"fold_{f}" for f in folds), "mean", "std", "pooled", "cases"])
        for row in summary:
            writer.writerow([row.task, "" if row.class_id is None else row.class_id, row.name, *row.fold_dice,
                             row.mean, row.std, row.pooled, row.cases])
    return path


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
