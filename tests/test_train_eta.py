"""The training log's run ETA: the mean pace of this run's epochs times the epochs left."""

from __future__ import annotations

import pytest

from pipeline.train.loop import run_eta


def test_eta_at_a_steady_pace_shrinks_to_zero() -> None:
    # The case: epoch 16 of 20 at 23 s per epoch has 4 epochs (92 s) left, not 0:23:49.
    assert run_eta(16 * 23.0, first_epoch=0, epoch=15, epochs=20) == pytest.approx(92.0)
    etas = [run_eta((e + 1) * 23.0, 0, e, 20) for e in range(20)]
    assert etas == sorted(etas, reverse=True) and etas[-1] == 0


def test_eta_of_a_resumed_run_counts_only_its_own_epochs() -> None:
    # Resumed at epoch 10: after 2 epochs of 30 s, 8 are left.
    assert run_eta(60.0, first_epoch=10, epoch=11, epochs=20) == pytest.approx(240.0)
