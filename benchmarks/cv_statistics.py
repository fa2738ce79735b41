"""train_accuracy.py --folds: Dice mean and spread over cross-validation folds, and the paired
per-fold differences of each universal model to the single-task nets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SINGLE = "single"  # the single-task nets, one per task, counted as one model


def fold_statistics(model: Mapping[str, Sequence[float]],
                    single: Mapping[str, Sequence[float]] | None = None) -> dict[str, dict[str, Any]]:
    """Per task, and for "mean" (the mean over tasks fold by fold), a model's per-fold Dice: its mean
    and sample std over the folds; with `single` (the single-task nets' Dice on the same folds) the
    paired differences model - single per fold, their mean and std, and `exceeds`: whether the
    mean difference is larger in size than its std (a difference inside its spread is no finding).
    NaN folds (no defined Dice) are left out of means; std is NaN below two folds."""
    tasks = list(model)
    series = {t: np.asarray(model[t], float) for t in tasks}
    series["mean"] = _fold_mean([series[t] for t in tasks])
    paired = None
    if single is not None:
        paired = {t: series[t] - np.asarray(single[t], float) for t in tasks}
        paired["mean"] = series["mean"] - _fold_mean([np.asarray(single[t], float) for t in tasks])
    stats = {}
    for key, values in series.items():
        mean, std = _spread(values)
        stats[key] = {"folds": values.tolist(), "mean": mean, "std": std}
        if paired is not None:
            difference, spread = _spread(paired[key])
            stats[key] |= {"difference": paired[key].tolist(), "difference_mean": difference,
                           "difference_std": spread, "exceeds": bool(abs(difference) > spread)}
    return stats


def _fold_mean(per_task: list[np.ndarray]) -> np.ndarray:
    stacked = np.vstack(per_task)
    counts = np.sum(~np.isnan(stacked), axis=0)
    return np.where(counts > 0, np.nansum(stacked, axis=0) / np.maximum(counts, 1), np.nan)


def _spread(values: np.ndarray) -> tuple[float, float]:
    defined = values[~np.isnan(values)]
    mean = float(defined.mean()) if defined.size else float("nan")
    return mean, float(defined.std(ddof=1)) if defined.size > 1 else float("nan")


def cv_statistics(results: list[dict[str, Any]], tasks: list[str], key: str) -> dict[str, dict[str, Any]]:
    """`fold_statistics` of every model's `key` ("out_of_fold" or "test") Dice; the single-task nets
    as one model whose task t figures are the net trained on task t alone."""
    singles = {r["task"]: r[key][r["task"]] for r in results if r["task"] is not None}
    single = singles if set(singles) == set(tasks) else None
    stats = {r["name"]: fold_statistics({t: r[key][t] for t in tasks}, single) for r in results if r["task"] is None}
    if single is not None:
        stats[SINGLE] = fold_statistics(single)
    return stats
