"""Training end to end on CPU: synthetic stores, Ray Train with 2 workers, MLflow, faults, jobs.

One module-wide set of synthetic stores (generator + `python -m pipeline.ingest`) and one
in-process Ray (2 CPUs) shared by the in-process tests; the last test starts its own Ray
cluster with `ray start --head` and submits the CLI as a Ray job.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import fsspec
import mlflow
import numpy as np
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

from cluster.simulate import s3_server
from pipeline.common.config import ExperimentConfig, load_config
from pipeline.common.mlflow_model import load_model
from pipeline.common.services import free_port
from pipeline.common.store import TaskStore
from pipeline.datasets.synthetic import write_collection
from pipeline.train.__main__ import main
from pipeline.train.data import BatchStream
from pipeline.train.loop import RunContext
from pipeline.train.run import RunExistsError, TrainResult, read_record, run
from pipeline.train.sampling import build_sampler

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The four default synthetic tasks (CT 3-class, CT 2-class, 2-ch MR, 4-ch MR) as stores."""
    root = tmp_path_factory.mktemp("train_data")
    sources = write_collection(root / "raw")
    command = [sys.executable, "-m", "pipeline.ingest", "--out", str(root / "stores"), "--num-workers", "2"]
    for source in sources:
        command += ["--source", str(source)]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return [str(root / "stores" / f"{s.name}.zarr") for s in sources]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train_runs")


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server on a free loopback port, and the AWS variables that point at it."""
    with s3_server(bucket="train") as env:
        yield env


@pytest.fixture(scope="module")
def local_ray(s3_env: dict[str, str]) -> Iterator[None]:
    """One in-process Ray for the module; its workers can reach the moto S3 server."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": s3_env})
    yield
    ray.shutdown()


def write_config(workdir: Path, stores: list[str], name: str, **sections: dict) -> Path:
    """A tiny-preset config for CPU tests (patch 16x32x32, few short epochs, 2 workers)."""
    raw = {
        "name": name,
        "data": {"stores": stores},
        "model": {"preset": "tiny", "patch_size": [16, 32, 32]},
        "train": {"epochs": 3, "iterations_per_epoch": 8, "batch_size": 2, "validate_every": 3,
                  "checkpoint_every": 3, "loader_workers": 1, "precision": "fp32", "log_every": 4},
        "ray": {"num_workers": 2, "cpus_per_worker": 1, "storage_path": str(workdir / "ray"), "max_failures": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "train-tests",
                   "registered_model": f"{name}-model"},
    }
    for section, values in sections.items():
        raw[section].update(values)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def loss_history(cfg: ExperimentConfig, run_id: str) -> list[tuple[int, float]]:
    client = MlflowClient(cfg.mlflow.tracking_uri)
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]


def test_stream_over_real_stores(stores: list[str]) -> None:
    opened = [TaskStore.open(s) for s in stores]
    sampler = build_sampler("balanced", [len(s.case_ids("train")) for s in opened], batches=4, batch_size=2)
    stream = BatchStream(sampler, stores, [s.manifest.num_classes for s in opened], (16, 32, 32), epochs=1)
    batches = list(stream)
    assert len(batches) == 4
    for batch in batches:
        task = int(batch["task"][0])
        assert batch["image"].shape == (2, opened[task].manifest.in_channels, 16, 32, 32)
        assert batch["label"].max() < opened[task].manifest.num_classes
        assert batch["label"][1].gt(0).any()  # the forced-foreground sample


@pytest.fixture(scope="module")
def trained(stores: list[str], workdir: Path, local_ray: None) -> tuple[ExperimentConfig, TrainResult]:
    """The run `e2e`: 2 workers, 4 tasks, 3 epochs of 8 iterations, registered as e2e-model."""
    cfg = load_config(write_config(workdir, stores, "e2e"))
    return cfg, run(cfg)


@pytest.mark.slow
def test_two_workers_train_and_register(stores: list[str], trained: tuple[ExperimentConfig, TrainResult]) -> None:
    cfg, result = trained

    losses = loss_history(cfg, result.mlflow_run_id)
    assert [step for step, _ in losses] == [0, 1, 2]
    assert losses[-1][1] < losses[0][1], f"loss did not fall: {losses}"
    client = MlflowClient(cfg.mlflow.tracking_uri)
    mlflow_run = client.get_run(result.mlflow_run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["train.iterations_per_epoch"] == "8"
    metrics = mlflow_run.data.metrics
    manifests = [TaskStore.open(s).manifest for s in stores]
    for manifest in manifests:
        for cls, label in manifest.labels.items():
            if cls:
                assert f"dice/{manifest.task_name}/{label.replace(' ', '_')}" in metrics
    assert 0 < metrics["dice/mean"] <= 1
    # Balanced sampling, counted: 2 ranks x 8 batches x 2 samples per epoch = 8 samples per task.
    assert {m.task_name: metrics[f"samples/{m.task_name}"] for m in manifests} == {m.task_name: 8 for m in manifests}
    artifacts = {a.path for folder in ("plots", "config") for a in client.list_artifacts(result.mlflow_run_id, folder)}
    assert {"plots/loss.png", "plots/dice.png", "config/config.yaml"} <= artifacts

    assert result.model_uri == "models:/e2e-model/1"
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    network, card = load_model(result.model_uri)
    assert [t.name for t in card.tasks] == [m.task_name for m in manifests]
    assert card.spec.patch_size == (16, 32, 32)
    for task, manifest in zip(card.tasks, manifests):
        assert task.labels == manifest.labels and task.modalities == manifest.modalities
        assert task.target_spacing == pytest.approx(manifest.target_spacing)
        assert task.normalization == tuple(n.to_dict() for n in manifest.normalization)
    with torch.no_grad():
        logits = network(torch.zeros(1, 4, 16, 32, 32), [3])[0]
    assert logits.shape == (1, 4, 16, 32, 32)


@pytest.mark.slow
def test_existing_run_is_not_repeated_and_resume_continues(
    workdir: Path, trained: tuple[ExperimentConfig, TrainResult]
) -> None:
    config = workdir / "e2e.yaml"
    cfg = trained[0]
    with pytest.raises(RunExistsError, match="--resume e2e"):
        run(cfg)
    assert main(["--config", str(config)]) == 2
    finished = run(cfg, resume=True)  # nothing to do: no new epochs, no new model version
    assert finished.model_uri == "models:/e2e-model/1"

    storage = f"ray.storage_path={workdir / 'ray'}"
    assert main(["--resume", "e2e", "--set", storage, "--set", "train.epochs=4"]) == 0
    record = read_record(str(workdir / "ray" / "e2e"))
    assert record.status == "finished" and record.epochs_done == 4 and record.model_uri == "models:/e2e-model/2"
    assert [step for step, _ in loss_history(cfg, record.mlflow_run_id)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_killed_worker_is_restarted_from_the_checkpoint_on_s3(
    stores: list[str], workdir: Path, local_ray: None, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stores and checkpoints on S3; rank 1 is SIGKILLed halfway through epoch 1."""
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    s3 = fsspec.filesystem("s3")
    s3_stores = []
    for store in (stores[0], stores[2]):  # CT liver (3 classes), 2-channel MR prostate
        s3.put(store, f"train/stores/{Path(store).name}", recursive=True)
        s3_stores.append(f"s3://train/stores/{Path(store).name}")
    train = {"epochs": 3, "iterations_per_epoch": 6, "checkpoint_every": 1, "validate_every": 3}
    cfg = load_config(write_config(workdir, s3_stores, "fault", train=train, ray={"storage_path": "s3://train/ray"}))
    marker = workdir / "fault-fired"
    result = run(cfg, context=RunContext(fail_epoch=1, fail_rank=1, fail_marker=str(marker)))
    assert marker.exists(), "the injected failure did not fire"
    # Epoch 1 died halfway and was never reported; the restarted workers resumed after epoch 0:
    # every epoch is logged exactly once.
    assert [step for step, _ in loss_history(cfg, result.mlflow_run_id)] == [0, 1, 2]
    assert result.metrics["epoch"] == 2
    assert result.checkpoint.startswith("s3://train/ray/fault/checkpoint_")
    assert read_record("s3://train/ray/fault").status == "finished"
    s3.get(result.checkpoint, str(workdir / "fault-checkpoint"), recursive=True)
    _, card = load_model(str(workdir / "fault-checkpoint"))
    assert card.metadata["epochs_trained"] == 3



@pytest.mark.slow
def test_ray_job_submit_against_a_started_cluster(stores: list[str], workdir: Path) -> None:
    ray.shutdown()  # the in-process Ray of the other tests, if any
    train = {"epochs": 1, "iterations_per_epoch": 6, "validate_every": 1, "checkpoint_every": 1}
    config = write_config(workdir, stores, "job", train=train)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    # Every port Ray would otherwise take from a fixed default, so other Ray clusters on this
    # machine (other test runs) cannot take the job agent's port.
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "runtime-env-agent-port", "metrics-export-port",
                                                      "ray-client-server-port")]
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # Ray's socket paths must stay short
    head_log = open(workdir / "ray-head.log", "w")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
         "--num-cpus", "2", "--temp-dir", temp_dir, *ports],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_for(f"http://127.0.0.1:{dashboard}/api/version", head, workdir / "ray-head.log", timeout=120)
        command = [str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                   "--working-dir", ".", "--", "python", "-m", "pipeline.train", "--config", str(config)]
        for _ in range(30):  # the dashboard answers before the node's job agent has registered
            submitted = subprocess.run(command, cwd=ROOT, env={**env, "RAY_AUTH_MODE": "token"},
                                       capture_output=True, text=True, timeout=400)
            if "No available agent" not in submitted.stderr + submitted.stdout:
                break
            time.sleep(2)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        assert "succeeded" in submitted.stdout + submitted.stderr
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    record = read_record(str(workdir / "ray" / "job"))
    assert record.status == "finished" and record.epochs_done == 1
    assert np.isfinite(MlflowClient(record.tracking_uri).get_run(record.mlflow_run_id).data.metrics["dice/mean"])


def _wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until the server answers at all (401 without a token counts: it is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")
