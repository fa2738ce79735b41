"""`--on-ray`: the same task graph through Dask on Ray, on a local Ray started for this test only."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.common.config import IngestConfig
from pipeline.common.store import TaskStore
from pipeline.ingest.run import run


@pytest.mark.slow
def test_ingest_on_local_ray(raw_msd: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = run([raw_msd], str(tmp_path), IngestConfig(on_ray=True))
        assert ray.is_initialized()  # run() leaves a Ray it did not start alone
    finally:
        ray.shutdown()
    assert report.ok and len(report.datasets[0].ingested) == 5
    store = TaskStore.open(report.datasets[0].store)
    assert store.read_case("tinyliver_000")[1] is not None
