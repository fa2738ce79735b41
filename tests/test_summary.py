"""`pipeline.common.summary`: the per-task rows, statistics and outputs that validation,
cross-validation and evaluation share (their own tests check each stage's columns)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.common.summary import (
    TASK_MEAN, ClassRow, markdown_table, mean, metric_dict, per_task, spread, task_rows, write_csv_rows,
)

NAN = math.nan


@dataclass(frozen=True)
class Row(ClassRow):
    dice: float


def _rows() -> list[Row]:
    """Task "b" first met, its classes given out of order; class 2 of "b" has no defined value."""
    scores = [("b", 2, "tumour", NAN), ("b", 1, "organ", 0.8), ("a x", 1, "lung", 0.5), ("b", 1, "organ", 0.6)]
    return per_task(scores, key=lambda s: s[:3],
                    class_row=lambda task, cls, name, mine: Row(task, cls, name, mean(s[3] for s in mine)),
                    task_row=lambda task, classes: Row(task, None, TASK_MEAN, mean(c.dice for c in classes)))


def test_spread_leaves_nan_out_and_needs_more_values_than_ddof() -> None:
    two = spread([0.2, NAN, 0.4])
    assert (two.mean, two.std, two.n) == (pytest.approx(0.3), pytest.approx(0.1), 2)
    one = spread([0.5, NAN], ddof=1)
    assert (one.mean, one.n) == (0.5, 1) and math.isnan(one.std)
    assert math.isnan(mean([NAN])) and spread([]).n == 0


def test_rows_per_task_in_order_met_classes_sorted_then_the_task_mean() -> None:
    rows = _rows()
    assert [(r.task, r.class_id) for r in rows] == [("b", 1), ("b", 2), ("b", None), ("a x", 1), ("a x", None)]
    assert rows[0].dice == pytest.approx(0.7) and math.isnan(rows[1].dice)
    assert rows[2].dice == pytest.approx(0.7)  # the undefined class is left out of the task's mean
    assert [r.task for r in task_rows(rows)] == ["b", "a x"]
    assert (rows[0].label(), rows[2].label()) == ("1 organ", "**mean**")


def test_metric_names_table_and_csv(tmp_path: Path) -> None:
    rows = _rows()
    metrics = metric_dict("eval/test", {"dice": 0.6, "hd95": NAN}, rows, lambda r: {"dice": r.dice})
    assert metrics == {"eval/test/dice": 0.6, "eval/test/b/organ/dice": pytest.approx(0.7),
                       "eval/test/b/dice": pytest.approx(0.7), "eval/test/a_x/lung/dice": 0.5,
                       "eval/test/a_x/dice": 0.5}
    lines = markdown_table("T", ["task", "class", "dice"], ([r.task, r.label(), r.dice] for r in rows[:1]))
    assert lines[:4] == ["# T", "", "| task | class | dice |", "|---|---|---:|"]
    assert lines[4].startswith("| b | 1 organ | 0.7")
    path = write_csv_rows(tmp_path / "s.csv", ["task", "dice"], [["b", NAN]])
    assert list(csv.reader(path.open())) == [["task", "dice"], ["b", "nan"]]
