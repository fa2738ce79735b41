"""benchmarks/train_accuracy.py's cross-validation statistics (benchmarks/cv_statistics.py): known
answers on built fold figures (binary-exact values, so the "larger than its spread" rule is tested
at its boundary)."""

import math

import pytest

from benchmarks.cv_statistics import cv_statistics, fold_statistics


def test_fold_statistics_mean_std_and_paired_differences() -> None:
    model = {"a": [0.75, 1.0, 0.5], "b": [0.5, 0.5, 0.5]}
    single = {"a": [0.5, 0.5, 0.5], "b": [0.25, 0.25, 0.25]}
    stats = fold_statistics(model, single)
    assert stats["a"]["mean"] == 0.75 and stats["a"]["std"] == 0.25
    # a - single: 0.25, 0.5, 0.0 -> mean 0.25, std 0.25: equal to its spread, so not larger
    assert stats["a"]["difference"] == [0.25, 0.5, 0.0]
    assert (stats["a"]["difference_mean"], stats["a"]["difference_std"], stats["a"]["exceeds"]) == (0.25, 0.25, False)
    # b - single: 0.25 in every fold -> std 0, larger than its spread
    assert (stats["b"]["difference_mean"], stats["b"]["difference_std"], stats["b"]["exceeds"]) == (0.25, 0.0, True)
    # mean over tasks fold by fold: 0.625, 0.75, 0.5 against single's 0.375 in every fold
    assert stats["mean"]["folds"] == [0.625, 0.75, 0.5]
    assert stats["mean"]["mean"] == 0.625 and stats["mean"]["std"] == 0.125
    assert (stats["mean"]["difference_mean"], stats["mean"]["difference_std"]) == (0.25, 0.125)
    assert stats["mean"]["exceeds"] is True


def test_fold_statistics_leaves_undefined_folds_out() -> None:
    stats = fold_statistics({"a": [0.5, math.nan, 0.25], "b": [math.nan, math.nan, 0.75]})
    assert stats["a"]["mean"] == 0.375 and stats["a"]["std"] == pytest.approx(0.1767767, abs=1e-7)
    assert stats["b"]["mean"] == 0.75 and math.isnan(stats["b"]["std"])  # one fold: no spread
    folds = stats["mean"]["folds"]  # fold 1 has no task with a value
    assert folds[0] == 0.5 and math.isnan(folds[1]) and folds[2] == 0.5
    assert stats["mean"]["mean"] == 0.5 and stats["mean"]["std"] == 0.0
    assert "difference_mean" not in stats["a"]


def test_cv_statistics_pairs_each_task_with_its_own_single_task_net() -> None:
    results = [
        {"name": "uni", "task": None, "out_of_fold": {"a": [0.75, 0.75], "b": [0.5, 0.25]}},
        {"name": "single-a", "task": "a", "out_of_fold": {"a": [0.5, 0.5]}},
        {"name": "single-b", "task": "b", "out_of_fold": {"b": [0.5, 0.5]}},
    ]
    stats = cv_statistics(results, ["a", "b"], "out_of_fold")
    assert set(stats) == {"uni", "single"}
    assert stats["uni"]["a"]["difference"] == [0.25, 0.25]
    assert stats["uni"]["b"]["difference"] == [0.0, -0.25]
    assert stats["single"]["mean"]["folds"] == [0.5, 0.5]
    assert "difference_mean" not in stats["single"]["a"]


def test_real_accuracy_over_seeds_pairs_each_seed_and_skips_single_seed_budgets() -> None:
    from benchmarks.real_accuracy import over_seeds

    def row(budget: int, seed: int, ours: float, peer: float) -> dict:
        return {"budget": budget, "task": "T", "seed": seed, "preset": "tiny",
                "ours": {"dice": {"T": {"mean": ours}}}, "nnunet": {"dice": {"T": {"mean": peer}}}}

    rows = [row(250, 0, 0.75, 0.5), row(250, 1, 0.5, 0.5), row(250, 2, 1.0, 0.5), row(500, 0, 0.5, 0.5)]
    (summary,) = over_seeds(rows)
    assert (summary["budget"], summary["seeds"]) == (250, [0, 1, 2])
    assert summary["ours"] == {"mean": 0.75, "std": 0.25} and summary["nnunet"] == {"mean": 0.5, "std": 0.0}
    assert summary["difference"] == {"mean": 0.25, "std": 0.25}
