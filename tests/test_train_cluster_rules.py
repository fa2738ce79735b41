"""Cluster rules of the training driver, without a cluster: local paths refused on more than one
node (one line each, naming the path and the fix), elastic worker ranges, per-rank metric names, RNG states in checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.common.config import ConfigError, config_from_dict
from pipeline.train.checkpoint import TrainState
from pipeline.train.run import check_paths_are_shared, worker_resources
from pipeline.train.mlflow_run import merge_rank_metrics


def _cfg(tmp_path: Path, **ray: object) -> object:
    store = tmp_path / "Task01_Liver.zarr"
    store.mkdir(exist_ok=True)
    return config_from_dict({"data": {"stores": [str(store), "s3://bucket/stores/Task02_Spleen.zarr"]},
                             "ray": {"storage_path": "s3://bucket/ray", **ray}})


def test_local_paths_fail_on_several_nodes_one_line_each(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    check_paths_are_shared(cfg, "s3://bucket/ray", "sqlite:////tmp/mlflow.db", nodes=1)  # one node: fine
    with pytest.raises(ConfigError) as err:
        check_paths_are_shared(cfg, "/home/ray/outputs/ray", "sqlite:////tmp/mlflow.db", nodes=3)
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["data.stores", "ray.storage_path", "mlflow.tracking_uri"]
    assert str(tmp_path / "Task01_Liver.zarr") in lines[0] and "s3://bucket" not in lines[0]
    assert all("3 nodes" in line and "ray.shared_filesystem=true" in line for line in lines)
    assert "MLflow server" in lines[2]
    check_paths_are_shared(cfg, "s3://bucket/ray", "http://10.0.0.1:5000", nodes=1)
    check_paths_are_shared(_cfg(tmp_path, shared_filesystem=True), "/mnt/efs/ray", "sqlite:////mnt/efs/m.db", nodes=3)


def test_elastic_worker_range_and_custom_resources(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, num_workers=[1, 4], resources_per_worker={"trainer": 1}, use_gpu=True)
    assert cfg.ray.num_workers == (1, 4) and cfg.ray.worker_range == (1, 4)
    assert worker_resources(cfg) == {"CPU": 1.0, "GPU": 1, "trainer": 1.0}
    assert _cfg(tmp_path, num_workers=3).ray.worker_range == (3, 3)
    with pytest.raises(ConfigError, match=r"ray.num_workers: \[min, max\] needs min <= max, got \[4, 1\]"):
        _cfg(tmp_path, num_workers=[4, 1])


def test_rank_metrics_are_named_per_rank() -> None:
    reports = [{"train/loss": 0.5, "samples/A": 8.0, "rank/loss": 0.4, "epoch": 3},
               {"train/loss": 0.5, "samples/A": 8.0, "rank/loss": 0.6, "epoch": 3}]
    assert merge_rank_metrics(reports) == {"train/loss": 0.5, "samples/A": 8.0, "rank0/loss": 0.4, "rank1/loss": 0.6}


def test_rng_states_round_trip_through_a_checkpoint_state(tmp_path: Path) -> None:
    state = TrainState()
    state.capture_rng()
    expected = torch.rand(3)
    assert state.cuda_rng is None if not torch.cuda.is_available() else len(state.cuda_rng) == torch.cuda.device_count()
    torch.save(state.__dict__, tmp_path / "train_state.pt")  # as save_checkpoint writes it
    restored = TrainState(**torch.load(tmp_path / "train_state.pt", weights_only=True))
    restored.restore_rng()
    assert torch.equal(torch.rand(3), expected)
