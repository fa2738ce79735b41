"""The task table a universal network is built for: data (read from the stores), not code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """One segmentation task: its name, class count (background included) and input channels."""

    name: str
    num_classes: int
    in_channels: int

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("task name must not be empty")
        if self.num_classes < 2:
            raise ValueError(f"task {self.name}: num_classes must be >= 2 (background included), got {self.num_classes}")
        if self.in_channels < 1:
            raise ValueError(f"task {self.name}: in_channels must be >= 1, got {self.in_channels}")


class ClassesAndChannels:
    """`num_classes` and `in_channels` of a record that holds a task's `labels` (class id -> name,
    background included) and `modalities` (one per input channel): a store's manifest, a model's card."""

    labels: Mapping[int, str]
    modalities: Sequence[str]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return len(self.modalities)


def check_task_table(tasks: Sequence[TaskSpec]) -> tuple[TaskSpec, ...]:
    """Validate a task table (non-empty, unique names) and return it as a tuple."""
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("a universal network needs at least one task")
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate task names: {', '.join(duplicates)}")
    return tasks
