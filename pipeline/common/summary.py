"""Per-task summaries of per-case, per-class scores, as validation, cross-validation and
evaluation report them.

Rows come per task (tasks in the order first met): a row per class (in class order), then the
task's mean row (`class_id` None, named "mean") from its class rows; an overall value averages
the task rows. Means and spreads leave NaN out (`pipeline.common.metrics`: NaN says nothing
about a class), and a value with nothing left to average is NaN. The stages keep their own
columns (a dataclass extending `ClassRow`) and build them, their Markdown table, CSV and MLflow
metric dict with these functions.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from pipeline.common.metrics import metric_name

TASK_MEAN = "mean"

Item = TypeVar("Item")
Row = TypeVar("Row", bound="ClassRow")
Key = Callable[[Item], tuple[str, int, str]]  # an item's (task, class id, class name)


@dataclass(frozen=True)
class ClassRow:
    """One class of a task, or (class_id None) the task's mean over its classes."""

    task: str
    class_id: int | None
    name: str

    def label(self) -> str:
        """The class cell of a table: `<id> <name>`, or the mean row's name in bold."""
        return f"**{self.name}**" if self.class_id is None else f"{self.class_id} {self.name}"


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float
    n: int  # the finite values


def finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if math.isfinite(v)]


def mean(values: Iterable[float]) -> float:
    """The mean of the finite values; NaN when there are none."""
    kept = finite(values)
    return float(np.mean(kept)) if kept else math.nan


def spread(values: Iterable[float], ddof: int = 0) -> Spread:
    """Mean, standard deviation (NaN unless more than `ddof` values) and count of the finite values."""
    kept = finite(values)
    return Spread(mean(kept), float(np.std(kept, ddof=ddof)) if len(kept) > ddof else math.nan, len(kept))


def group(items: Iterable[Item], key: Key) -> dict[str, dict[tuple[int, str], list[Item]]]:
    """Items by task (in the order first met), then by (class id, class name) in class order."""
    tasks: dict[str, dict[tuple[int, str], list[Item]]] = {}
    for item in items:
        task, class_id, name = key(item)
        tasks.setdefault(task, {}).setdefault((class_id, name), []).append(item)
    return {task: dict(sorted(classes.items())) for task, classes in tasks.items()}


def per_task(items: Iterable[Item], key: Key, class_row: Callable[[str, int, str, list[Item]], Row],
             task_row: Callable[[str, list[Row]], Row]) -> list[Row]:
    """Per task: `class_row(task, class_id, name, items)` per class, then `task_row(task, class_rows)`."""
    rows: list[Row] = []
    for task, classes in group(items, key).items():
        per_class = [class_row(task, class_id, name, mine) for (class_id, name), mine in classes.items()]
        rows += [*per_class, task_row(task, per_class)]
    return rows


def task_rows(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.class_id is None]


def metric_dict(prefix: str, overall: Mapping[str, float], rows: Sequence[Row],
                values: Callable[[Row], Mapping[str, float]]) -> dict[str, float]:
    """`<prefix>/<key>` for `overall`, `<prefix>/<task>[/<class>]/<key>` for each row's `values` (MLflow-safe
    names; a task's mean row has no class part); finite values only."""
    metrics = {f"{prefix}/{k}": v for k, v in overall.items()}
    for row in rows:
        path = f"{prefix}/{metric_name(row.task)}" + ("" if row.class_id is None else f"/{metric_name(row.name)}")
        metrics |= {f"{path}/{k}": v for k, v in values(row).items()}
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def fmt(value: float, digits: int = 4) -> str:
    """A table cell: `-` for NaN."""
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(title: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of `# title` and a table whose first two columns (task, class) align left, the others right."""
    lines = [f"# {title}", "", f"| {' | '.join(header)} |", "|---|---|" + "---:|" * (len(header) - 2)]
    return lines + [f"| {' | '.join(map(str, row))} |" for row in rows]


def write_csv_rows(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path
