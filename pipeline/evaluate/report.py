"""The evaluation report: per-case CSV, per-class summary (Markdown, nnU-Net-style JSON and
MLflow metrics), box plots.

Means skip NaN values (the empty-mask rules of `pipeline.common.metrics`); `cases` counts the
cases whose Dice is defined. A task's "mean" row averages its class means, the overall Dice
averages the task means.

summary.json has nnU-Net's `evaluate_folder` keys: `metric_per_case` (task, case and per class
Dice, HD95, FP, FN, n_pred, n_ref), `mean` (per class: the mean of each metric over the cases,
NaN left out) and `foreground_mean` (the mean of the class means). Classes are keyed by id, as
`<task>/<id>` when the report holds several tasks.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline.common.metrics import ClassMetrics, metric_name

CSV_FILE = "metrics.csv"
MARKDOWN_FILE = "summary.md"
JSON_FILE = "summary.json"


@dataclass(frozen=True)
class CaseRow:
    task: str
    case: str
    metrics: ClassMetrics


@dataclass(frozen=True)
class ClassSummary:
    task: str
    class_id: int | None  # None: the task's mean over its classes
    name: str
    cases: int
    dice_mean: float
    dice_std: float
    hd95_mean: float
    hd95_median: float


def write_csv(rows: Sequence[CaseRow], path: Path) -> Path:
    """One line per case and class: task, case, then every ClassMetrics field."""
    metric_fields = [f.name for f in fields(ClassMetrics)]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "case", *metric_fields])
        for row in rows:
            values = asdict(row.metrics)
            writer.writerow([row.task, row.case, *(values[f] for f in metric_fields)])
    return path


def summarize(rows: Sequence[CaseRow]) -> list[ClassSummary]:
    """Per task: one summary per class (in class order), then the task's mean row."""
    summaries = []
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r.metrics for r in rows if r.task == task]
        classes = sorted({(m.class_id, m.name) for m in task_rows})
        per_class = [
            _class_summary(task, cid, name, [m for m in task_rows if m.class_id == cid]) for cid, name in classes
        ]
        summaries += per_class
        summaries.append(_task_mean(task, per_class))
    return summaries


def _class_summary(task: str, class_id: int, name: str, metrics: Sequence[ClassMetrics]) -> ClassSummary:
    dice = _finite([m.dice for m in metrics])
    hd95 = _finite([m.hd95 for m in metrics])
    return ClassSummary(task, class_id, name, len(dice), _stat(np.mean, dice), _stat(np.std, dice),
                        _stat(np.mean, hd95), _stat(np.median, hd95))


def _task_mean(task: str, per_class: Sequence[ClassSummary]) -> ClassSummary:
    def mean_of(key: str) -> float:
        return _stat(np.mean, _finite([getattr(s, key) for s in per_class]))

    return ClassSummary(task, None, "mean", max(s.cases for s in per_class), mean_of("dice_mean"), math.nan,
                        mean_of("hd95_mean"), mean_of("hd95_median"))


def _stat(function: Callable[[list[float]], float], values: list[float]) -> float:
    return float(function(values)) if values else math.nan


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if math.isfinite(v)]


def markdown(summaries: Sequence[ClassSummary], title: str) -> str:
    lines = [f"# {title}", "", "| task | class | cases | Dice mean | Dice std | HD95 mean (mm) | HD95 median (mm) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for s in summaries:
        name = f"**{s.name}**" if s.class_id is None else f"{s.class_id} {s.name}"
        lines.append(f"| {s.task} | {name} | {s.cases} | {_fmt(s.dice_mean, 4)} | {_fmt(s.dice_std, 4)} | "
                     f"{_fmt(s.hd95_mean, 2)} | {_fmt(s.hd95_median, 2)} |")
    overall = overall_dice(summaries)
    lines += ["", f"Mean Dice over tasks: {_fmt(overall, 4)}", ""]
    return "\n".join(lines)


def _fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def overall_dice(summaries: Sequence[ClassSummary]) -> float:
    return _stat(np.mean, _finite([s.dice_mean for s in summaries if s.class_id is None]))


def mlflow_metrics(summaries: Sequence[ClassSummary], split: str) -> dict[str, float]:
    """`eval/<split>/<task>/<class>/{dice,hd95}`, `eval/<split>/<task>/dice` and `eval/<split>/dice`
    (finite values only)."""
    metrics = {f"eval/{split}/dice": overall_dice(summaries)}
    for s in summaries:
        prefix = f"eval/{split}/{metric_name(s.task)}" + ("" if s.class_id is None else f"/{metric_name(s.name)}")
        metrics[f"{prefix}/dice"] = s.dice_mean
        metrics[f"{prefix}/hd95"] = s.hd95_mean
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def box_plots(rows: Sequence[CaseRow], folder: Path) -> list[Path]:
    """One PNG per task, `boxplot_<task>.png`: Dice and HD95 per class over the cases."""
    written = []
    for task in dict.fromkeys(r.task for r in rows):
        metrics = [r.metrics for r in rows if r.task == task]
        classes = sorted({(m.class_id, m.name) for m in metrics})
        fig = Figure(figsize=(4 + 1.5 * len(classes), 4))
        axes = fig.subplots(1, 2)
        for ax, key, label in ((axes[0], "dice", "Dice"), (axes[1], "hd95", "HD95 (mm)")):
            data = [_finite([getattr(m, key) for m in metrics if m.class_id == cid]) for cid, _ in classes]
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
    mean = {}
    for class_key in dict.fromkeys(key(r) for r in rows):
        cases = [values(r.metrics) for r in rows if key(r) == class_key]
        mean[class_key] = {name: _stat(np.mean, _finite([c[name] for c in cases])) for name in cases[0]}
    foreground = {name: _stat(np.mean, _finite([m[name] for m in mean.values()])) for name in next(iter(mean.values()))}
    return _nulls({"metric_per_case": list(per_case.values()), "mean": mean, "foreground_mean": foreground})


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
