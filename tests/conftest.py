"""Shared test fixtures: small synthetic raw datasets, written once per session (treat as read-only;
copy before changing them)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.datasets.synthetic import SyntheticTask, write_task

TINY_CT = SyntheticTask("Task01_TinyLiver", ("CT",), ("background", "liver", "tumour"),
                        spacing=(1.5, 1.5, 4.0), shape=(32, 32, 16), num_cases=4, num_test_cases=1)
TINY_MR = SyntheticTask("Task02_TinyProstate", ("T2", "ADC"), ("background", "peripheral zone", "transition zone"),
                        spacing=(1.0, 1.0, 3.0), shape=(32, 32, 16), num_cases=3, num_test_cases=1)


@pytest.fixture(scope="session")
def tiny_mr_task() -> SyntheticTask:
    return TINY_MR


@pytest.fixture(scope="session")
def raw_msd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny CT task in the original MSD layout (3D files, `training` list in dataset.json)."""
    return write_task(tmp_path_factory.mktemp("msd"), TINY_CT, layout="msd")


@pytest.fixture(scope="session")
def raw_nnunet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny 2-channel MR task in the nnU-Net v2 layout (one file per channel)."""
    return write_task(tmp_path_factory.mktemp("nnunet"), TINY_MR, layout="nnunetv2")


@pytest.fixture(autouse=True)
def _fresh_s3_clients() -> Iterator[None]:
    """s3fs caches filesystems by their arguments, not by the AWS_* variables that point a test at
    its moto server: without this, a later test reuses a client of an earlier test's stopped server."""
    yield
    if (s3fs := sys.modules.get("s3fs")) is not None:  # nothing cached when no test imported it
        s3fs.S3FileSystem.clear_instance_cache()
