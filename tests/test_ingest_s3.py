"""Ingest to s3:// and read back, against a moto S3 server on a free loopback port."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cluster.simulate import CREDENTIALS, s3_server
from pipeline.common.config import IngestConfig
from pipeline.common.store import TaskStore
from pipeline.ingest.run import run


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_server(bucket="stores") as env:
        yield env["AWS_ENDPOINT_URL"]


@pytest.fixture
def storage_options(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    return {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}


def test_ingest_to_s3_and_read_patches(raw_msd: Path, storage_options: dict) -> None:
    cfg = IngestConfig(scheduler="threads")
    report = run([raw_msd], "s3://stores/api", cfg, storage_options)
    assert report.ok and report.datasets[0].store == f"s3://stores/api/{raw_msd.name}.zarr"
    store = TaskStore.open(report.datasets[0].store, storage_options)
    assert len(store.manifest.cases) == 5
    image, label, case_id = store.sample_patch(np.random.default_rng(0), (8, 16, 16), force_foreground=True)
    assert image.shape == (1, 8, 16, 16) and label.any()
    full_image, full_label = store.read_case(case_id)
    assert full_image.shape[1:] == full_label.shape
    copy = pickle.loads(pickle.dumps(store))  # as a data loader worker gets it
    np.testing.assert_array_equal(copy.read_patch(case_id, (0, 0, 0), full_label.shape)[1], full_label)
    again = run([raw_msd], "s3://stores/api", cfg, storage_options).datasets[0]
    assert again.ingested == [] and len(again.skipped) == 5


def test_cli_to_s3_with_endpoint_from_environment(raw_msd: Path, s3_endpoint: str) -> None:
    env = os.environ | CREDENTIALS | {"AWS_ENDPOINT_URL": s3_endpoint}
    cmd = [sys.executable, "-m", "pipeline.ingest", "--source", str(raw_msd), "--out", "s3://stores/cli",
           "--num-workers", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    store = TaskStore.open(f"s3://stores/cli/{raw_msd.name}.zarr", {"endpoint_url": s3_endpoint,
                                                                    "key": "testing", "secret": "testing"})
    assert store.case_ids("test") == ["tinyliver_004"]
