"""The evaluation report: per-case CSV, per-class summary (Markdown, nnU-Net-style JSON and
MLflow metrics), box plots.

Per task and class as `pipeline.common.summary` builds rows (NaN left out of means, a task's
"mean" row averages its class means, the overall Dice the task means): the cases whose Dice is
defined, their Dice mean and std, HD95 mean and median.

summary.json has nnU-Net's `evaluate_folder` keys: `metric_per_case` (task, case and per class
Dice, HD95, FP, FN, n_pred, n_ref), `mean` (per class: the mean of each metric over the cases,
NaN left out) and `foreground_mean` (the mean of the class means). Classes are keyed by id, as
`<task>/<id>` when the report holds several tasks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline.common.metrics import ClassMetrics, metric_name
from pipeline.common.summary import (
    TASK_MEAN, ClassRow, finite, fmt, group, markdown_table, mean, metric_dict, per_task, spread, task_rows,
    write_csv_rows,
)

CSV_FILE = "metrics.csv"
MARKDOWN_FILE = "summary.md"
JSON_FILE = "summary.json"


@dataclass(frozen=True)
class CaseRow:
    task: str
    case: str
    metrics: ClassMetrics


@dataclass(frozen=True)
class ClassSummary(ClassRow):
    cases: int
    dice_mean: float
    dice_std: float
    hd95_mean: float
    hd95_median: float


def write_csv(rows: Sequence[CaseRow], path: Path) -> Path:
    """One line per case and class: task, case, then every ClassMetrics field."""
    return write_csv_rows(path, ["task", "case", *(f.name for f in fields(ClassMetrics))],
                          ([row.task, row.case, *astuple(row.metrics)] for row in rows))


def summarize(rows: Sequence[CaseRow]) -> list[ClassSummary]:
    """Per task: one summary per class (in class order), then the task's mean row."""
    return per_task(rows, lambda r: (r.task, r.metrics.class_id, r.metrics.name), _class_summary, _task_mean)


def _class_summary(task: str, class_id: int, name: str, rows: Sequence[CaseRow]) -> ClassSummary:
    dice = spread(r.metrics.dice for r in rows)
    hd95 = finite(r.metrics.hd95 for r in rows)
    return ClassSummary(task, class_id, name, dice.n, dice.mean, dice.std, mean(hd95),
                        float(np.median(hd95)) if hd95 else math.nan)


def _task_mean(task: str, per_class: Sequence[ClassSummary]) -> ClassSummary:
    return ClassSummary(task, None, TASK_MEAN, max(s.cases for s in per_class), mean(s.dice_mean for s in per_class),
                        math.nan, mean(s.hd95_mean for s in per_class), mean(s.hd95_median for s in per_class))


def markdown(summaries: Sequence[ClassSummary], title: str) -> str:
    header = ["task", "class", "cases", "Dice mean", "Dice std", "HD95 mean (mm)", "HD95 median (mm)"]
    lines = markdown_table(title, header, ([s.task, s.label(), s.cases, fmt(s.dice_mean), fmt(s.dice_std),
                                            fmt(s.hd95_mean, 2), fmt(s.hd95_median, 2)] for s in summaries))
    return "\n".join([*lines, "", f"Mean Dice over tasks: {fmt(overall_dice(summaries))}", ""])


def overall_dice(summaries: Sequence[ClassSummary]) -> float:
    return mean(s.dice_mean for s in task_rows(summaries))


def mlflow_metrics(summaries: Sequence[ClassSummary], split: str) -> dict[str, float]:
    """`eval/<split>/<task>/<class>/{dice,hd95}`, `eval/<split>/<task>/{dice,hd95}` and `eval/<split>/dice`
    (finite values only)."""
    return metric_dict(f"eval/{split}", {"dice": overall_dice(summaries)}, summaries,
                       lambda s: {"dice": s.dice_mean, "hd95": s.hd95_mean})


def box_plots(rows: Sequence[CaseRow], folder: Path) -> list[Path]:
    """One PNG per task, `boxplot_<task>.png`: Dice and HD95 per class over the cases."""
    written = []
    for task, classes in group(rows, lambda r: (r.task, r.metrics.class_id, r.metrics.name)).items():
        fig = Figure(figsize=(4 + 1.5 * len(classes), 4))
        axes = fig.subplots(1, 2)
        for ax, key, label in ((axes[0], "dice", "Dice"), (axes[1], "hd95", "HD95 (mm)")):
            data = [finite(getattr(r.metrics, key) for r in mine) for mine in classes.values()]
            ax.boxplot(data, tick_labels=[name for _, name in classes])
            ax.set_ylabel(label)
            if key == "dice":
                ax.set_ylim(0, 1)
        fig.suptitle(task)
        fig.tight_layout()
        path = folder / f"boxplot_{metric_name(task)}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def nnunet_summary(rows: Sequence[CaseRow]) -> dict:
    """The summary.json content (module docstring); NaN written as null."""
    several = len({r.task for r in rows}) > 1

    def key(row: CaseRow) -> str:
        return f"{row.task}/{row.metrics.class_id}" if several else str(row.metrics.class_id)

    def values(m: ClassMetrics) -> dict[str, float]:
        return {"Dice": m.dice, "HD95": m.hd95, "FP": m.false_positives, "FN": m.false_negatives,
                "n_pred": m.predicted_voxels, "n_ref": m.reference_voxels}

    per_case: dict[tuple[str, str], dict] = {}
    for row in rows:
        entry = per_case.setdefault((row.task, row.case), {"task": row.task, "case": row.case, "metrics": {}})
        entry["metrics"][key(row)] = values(row.metrics)
    means = {}
    for class_key in dict.fromkeys(key(r) for r in rows):
        cases = [values(r.metrics) for r in rows if key(r) == class_key]
        means[class_key] = {name: mean(c[name] for c in cases) for name in cases[0]}
    foreground = {name: mean(m[name] for m in means.values()) for name in next(iter(means.values()))}
    return _nulls({"metric_per_case": list(per_case.values()), "mean": means, "foreground_mean": foreground})


def _nulls(value: object) -> object:
    """NaN as None (JSON null), recursively."""
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nulls(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def write_report(rows: Sequence[CaseRow], folder: Path, title: str) -> tuple[list[ClassSummary], list[Path]]:
    """CSV, Markdown, summary.json and box plots into `folder` (created); returns the summary and
    the files."""
    folder.mkdir(parents=True, exist_ok=True)
    summaries = summarize(rows)
    (folder / MARKDOWN_FILE).write_text(markdown(summaries, title))
    (folder / JSON_FILE).write_text(json.dumps(nnunet_summary(rows), indent=2))
    files = [write_csv(rows, folder / CSV_FILE), folder / MARKDOWN_FILE, folder / JSON_FILE, *box_plots(rows, folder)]
    return summaries, files
