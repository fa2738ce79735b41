"""Raw datasets for tests, demos and benchmarks: synthetic tasks and a small real CT set."""

from pipeline.datasets.real_ct import build_real_ct_dataset
from pipeline.datasets.synthetic import (
    DEFAULT_TASKS,
    SyntheticTask,
    generate_case,
    modality_type,
    write_collection,
    write_task,
)

__all__ = [
    "DEFAULT_TASKS",
    "SyntheticTask",
    "build_real_ct_dataset",
    "generate_case",
    "modality_type",
    "write_collection",
    "write_task",
]
