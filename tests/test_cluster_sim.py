"""The simulated cluster of cluster/simulate.py: three Ray nodes, a moto S3 server and an MLflow
server, all on 127.0.0.1. Stores are ingested to S3; an elastic run (1-2 workers, one per worker
node) loses node-b after an epoch on both nodes and gets it back; the model is registered in
the MLflow server and predicts from `models:/` in a fresh process. Also: local paths are refused
at start on this multi-node cluster."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import fsspec
import nibabel as nib
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

from cluster.simulate import (
    TASKS,
    Services,
    cluster_services,
    elastic_config,
    ingest_to_s3,
    predict_in_fresh_process,
    train_losing_a_node,
    write_raw_data,
)
from pipeline.common.metrics import metric_name
from pipeline.train.__main__ import main as train_main
from pipeline.train.checkpoint import STATE_FILE
from pipeline.train.run import read_record

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster_sim")


@pytest.fixture(scope="module")
def services(folder: Path) -> Iterator[Services]:
    if ray.is_initialized():  # left by another module
        ray.shutdown()
    env = pytest.MonkeyPatch()
    with cluster_services(folder) as started:
        for key, value in started.s3_env.items():
            env.setenv(key, value)  # the driver reads and writes S3 too
        try:
            yield started
        finally:
            env.undo()


def test_local_store_path_fails_at_start_with_one_line(services: Services, folder: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    local_store = folder / "Task01_Local.zarr"
    local_store.mkdir()
    config = folder / "local.yaml"
    config.write_text(yaml.safe_dump({
        "name": "local-paths", "data": {"stores": [str(local_store)]},
        "ray": {"storage_path": "s3://uniseg/ray"}, "mlflow": {"tracking_uri": services.tracking_uri},
    }))
    with caplog.at_level(logging.ERROR):
        assert train_main(["--config", str(config)]) == 2
    [message] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert message.count("\n") == 0, message
    assert str(local_store) in message and "s3://" in message and "ray.shared_filesystem=true" in message
    assert "3 nodes" in message
    assert read_record("s3://uniseg/ray/local-paths") is None  # nothing started
    assert MlflowClient(services.tracking_uri).get_experiment_by_name("uniseg") is None


def test_elastic_run_loses_a_node_and_grows_back(services: Services, folder: Path) -> None:
    sources = write_raw_data(folder / "raw")
    stores = ingest_to_s3(sources)
    assert stores == [f"s3://uniseg/stores/{t.name}.zarr" for t in TASKS]
    cfg = elastic_config(folder, stores, services.tracking_uri)
    outcome = train_losing_a_node(services.sim, cfg)
    assert outcome.error is None, outcome.error
    assert outcome.spanned == ["node-a", "node-b"], "two workers should run on the two trainer nodes"
    result = outcome.result
    epochs, iterations, batch = cfg.train.epochs, cfg.train.iterations_per_epoch, cfg.train.batch_size

    # Every epoch logged exactly once, with the world size it ran on: 2, then 1, then 2 again.
    client = MlflowClient(services.tracking_uri)
    logged = {key: sorted((m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, key))
              for key in ["train/world_size", *(f"samples/{metric_name(t.name)}" for t in TASKS)]}
    world = [int(value) for _, value in logged["train/world_size"]]
    assert [step for step, _ in logged["train/world_size"]] == list(range(epochs)), logged["train/world_size"]
    shrunk = world.index(1)
    assert world[0] == 2 and 2 in world[shrunk:], f"world size per epoch: {world}"
    # Balanced sampling, exact per epoch: each of the 2 tasks gets half of every rank's batches.
    for task in TASKS:
        samples = logged[f"samples/{metric_name(task.name)}"]
        assert samples == [(e, w * iterations * batch / 2) for e, w in enumerate(world)], (task.name, samples)
    metrics = client.get_run(result.mlflow_run_id).data.metrics
    assert {"rank0/loss", "rank1/loss", "dice/mean"} <= set(metrics)

    # The run record and the final checkpoint (on S3) agree: every epoch once, in order.
    record = read_record(f"{cfg.ray.storage_path}/{cfg.name}")
    assert record.status == "finished" and record.epochs_done == epochs
    assert result.checkpoint.startswith("s3://uniseg/ray/elastic/checkpoint_")
    with fsspec.open(f"{result.checkpoint}/{STATE_FILE}", "rb") as f:
        state = torch.load(f, weights_only=True)
    assert [int(h["epoch"]) for h in state["history"]] == list(range(epochs))
    assert [int(h["train/world_size"]) for h in state["history"]] == world

    # Registered in the server's registry; a fresh process that knows only the server predicts.
    assert result.model_uri == "models:/elastic-model/1"
    assert client.get_model_version("elastic-model", "1").run_id == result.mlflow_run_id
    scan = next((sources[0] / "imagesTs").glob("*.nii.gz"))
    labels = predict_in_fresh_process(result.model_uri, services.tracking_uri, TASKS[0].name, scan,
                                      folder / "predictions")
    assert nib.load(labels).shape == nib.load(scan).shape
