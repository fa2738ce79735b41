"""Task samplers: which task each training batch (or sample) comes from.

Every sampler gives each task a weight, turns the weights into exact per-epoch quotas
(largest remainder) and shuffles them, so an epoch holds each task's share exactly:

- ``balanced`` (UniSeg): equal weights, the same number of batches per task in random order;
- ``proportional``: weights proportional to the number of training cases;
- ``temperature``: weights ``n_cases ** (1 / T)`` (T = 1 is proportional, large T balanced).

The schedule of an epoch is a pure function of (seed, rank, epoch), so each rank draws its own
tasks, any number of loader workers reproduce it, and a resumed run continues it exactly. The
sampler's own state is only where the main process stands (epoch, batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

WeightFn = Callable[[np.ndarray, float], np.ndarray]

TASK_WEIGHTS: dict[str, WeightFn] = {
    "balanced": lambda sizes, temperature: np.ones_like(sizes),
    "proportional": lambda sizes, temperature: sizes,
    "temperature": lambda sizes, temperature: sizes ** (1.0 / temperature),
}


def task_weights(name: str, sizes: Sequence[int], temperature: float = 1.0) -> np.ndarray:
    """Normalised task probabilities of sampler `name` for tasks with `sizes` training cases."""
    if name not in TASK_WEIGHTS:
        raise ValueError(f"unknown sampling {name!r}; choose one of {', '.join(TASK_WEIGHTS)}")
    sizes_array = np.asarray(sizes, dtype=np.float64)
    if sizes_array.size == 0 or (sizes_array <= 0).any():
        raise ValueError(f"every task needs at least one training case, got sizes {list(sizes)}")
    if temperature <= 0:
        raise ValueError(f"sampling temperature must be > 0, got {temperature}")
    weights = TASK_WEIGHTS[name](sizes_array, temperature)
    return weights / weights.sum()


def quotas(weights: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split `total` draws over tasks by `weights`: floors plus remainders by weighted lottery."""
    exact = weights * total
    counts = np.floor(exact).astype(int)
    left = total - counts.sum()
    if left:
        remainder = exact - counts
        extra = rng.choice(len(weights), size=left, replace=False, p=remainder / remainder.sum())
        counts[extra] += 1
    return counts


@dataclass
class TaskSampler:
    """Per-rank schedule of task ids: `batches` batches of `batch_size` per epoch.

    With `mixed=False` every batch holds one task (as UniSeg); with `mixed=True` quotas are
    per sample and a batch may span tasks.
    """

    weights: tuple[float, ...]
    batches: int
    batch_size: int
    mixed: bool = False
    seed: int = 0
    rank: int = 0
    epoch: int = 0
    position: int = 0

    def schedule(self, epoch: int) -> list[tuple[int, ...]]:
        """Task ids of every batch of `epoch` on this rank, in order."""
        rng = np.random.default_rng([self.seed, self.rank, epoch, 0x7A5C])
        weights = np.asarray(self.weights)
        if self.mixed:
            draws = rng.permutation(np.repeat(np.arange(len(weights)), quotas(weights, self.batches * self.batch_size, rng)))
            return [tuple(int(t) for t in chunk) for chunk in draws.reshape(self.batches, self.batch_size)]
        draws = rng.permutation(np.repeat(np.arange(len(weights)), quotas(weights, self.batches, rng)))
        return [(int(t),) * self.batch_size for t in draws]

    def advance(self) -> None:
        """Record one consumed batch (the main process calls this once per step)."""
        self.position += 1
        if self.position == self.batches:
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": list(self.weights),
            "batches": self.batches,
            "batch_size": self.batch_size,
            "mixed": self.mixed,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where a checkpoint stopped; the task table must match."""
        if len(state["weights"]) != len(self.weights):
            raise ValueError(
                f"checkpoint sampler has {len(state['weights'])} tasks but this run has {len(self.weights)}"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def build_sampler(
    name: str,
    sizes: Sequence[int],
    *,
    batches: int,
    batch_size: int,
    mixed: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    rank: int = 0,
) -> TaskSampler:
    weights = task_weights(name, sizes, temperature)
    return TaskSampler(tuple(float(w) for w in weights), batches, batch_size, mixed, seed, rank)
