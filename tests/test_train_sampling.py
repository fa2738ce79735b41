"""Task samplers: each task gets its share per epoch (counted), ranks differ, state resumes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.train.sampling import TaskSampler, build_sampler, quotas, task_weights

SIZES = [40, 10, 30, 20]


def _batch_counts(sampler: TaskSampler, epoch: int) -> Counter:
    return Counter(batch[0] for batch in sampler.schedule(epoch))


def test_balanced_gives_every_task_the_same_number_of_batches() -> None:
    sampler = build_sampler("balanced", SIZES, batches=100, batch_size=2)
    for epoch in range(5):
        schedule = sampler.schedule(epoch)
        assert len(schedule) == 100
        assert all(len(set(batch)) == 1 and len(batch) == 2 for batch in schedule)  # one task per batch
        assert _batch_counts(sampler, epoch) == {0: 25, 1: 25, 2: 25, 3: 25}


def test_balanced_remainder_is_spread_by_at_most_one_batch() -> None:
    sampler = build_sampler("balanced", SIZES, batches=10, batch_size=2)
    counts = _batch_counts(sampler, 0)
    assert sum(counts.values()) == 10 and max(counts.values()) - min(counts.values()) == 1


def test_order_is_random_per_epoch() -> None:
    sampler = build_sampler("balanced", SIZES, batches=40, batch_size=2)
    assert sampler.schedule(0) != sampler.schedule(1)
    assert sampler.schedule(0) == sampler.schedule(0)  # a pure function of (seed, rank, epoch)


def test_proportional_follows_dataset_sizes() -> None:
    sampler = build_sampler("proportional", SIZES, batches=100, batch_size=2)
    assert _batch_counts(sampler, 3) == {0: 40, 1: 10, 2: 30, 3: 20}


def test_temperature_interpolates_between_proportional_and_balanced() -> None:
    np.testing.assert_allclose(task_weights("temperature", SIZES, 1.0), task_weights("proportional", SIZES))
    np.testing.assert_allclose(task_weights("temperature", SIZES, 1e6), task_weights("balanced", SIZES), atol=1e-5)
    sampler = build_sampler("temperature", SIZES, batches=1000, batch_size=1, temperature=2.0)
    expected = np.sqrt(SIZES) / np.sqrt(SIZES).sum() * 1000
    counts = _batch_counts(sampler, 0)
    assert all(abs(counts[t] - expected[t]) < 1 for t in range(4))


def test_mixed_batches_count_samples_and_may_span_tasks() -> None:
    sampler = build_sampler("balanced", SIZES, batches=50, batch_size=4, mixed=True)
    schedule = sampler.schedule(0)
    assert len(schedule) == 50 and all(len(b) == 4 for b in schedule)
    assert Counter(t for batch in schedule for t in batch) == {0: 50, 1: 50, 2: 50, 3: 50}
    assert any(len(set(batch)) > 1 for batch in schedule)


def test_each_rank_draws_its_own_tasks() -> None:
    rank0 = build_sampler("balanced", SIZES, batches=40, batch_size=2, rank=0)
    rank1 = build_sampler("balanced", SIZES, batches=40, batch_size=2, rank=1)
    assert rank0.schedule(0) != rank1.schedule(0)
    assert _batch_counts(rank0, 0) == _batch_counts(rank1, 0)


def test_quotas_sum_to_total() -> None:
    rng = np.random.default_rng(0)
    for total in (1, 7, 99):
        counts = quotas(np.array([0.5, 0.3, 0.2]), total, rng)
        assert counts.sum() == total


def test_state_round_trip_continues_where_it_stopped() -> None:
    sampler = build_sampler("balanced", SIZES, batches=3, batch_size=2, seed=7)
    for _ in range(7):
        sampler.advance()
    assert (sampler.epoch, sampler.position) == (2, 1)
    restored = build_sampler("balanced", SIZES, batches=3, batch_size=2, seed=0, rank=1)
    restored.load_state_dict(sampler.state_dict())
    assert (restored.epoch, restored.position, restored.seed, restored.rank) == (2, 1, 7, 1)
    with pytest.raises(ValueError, match="this run has 3"):
        build_sampler("balanced", SIZES[:3], batches=3, batch_size=2).load_state_dict(sampler.state_dict())


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="unknown sampling 'uniform'"):
        task_weights("uniform", SIZES)
    with pytest.raises(ValueError, match="at least one training case"):
        task_weights("balanced", [3, 0])
