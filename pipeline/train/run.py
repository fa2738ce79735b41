"""The training driver: Ray (local or a cluster), the MLflow run, TorchTrainer, the final model.

A run is named by `cfg.name` and lives in `<ray.storage_path>/<name>` (local or s3://), where
Ray Train keeps its checkpoints and this driver a small record (`uniseg_run.json`: status,
MLflow run id, epochs done, config). Starting a run whose folder exists is an error, so a
finished run is never repeated by accident; `resume=True` continues it from its last
checkpoint (Ray Train restores a run with the same name and storage path) and logs into the
same MLflow run. Lost workers are restarted by Ray Train up to `ray.max_failures` times, and
training goes on from the last checkpoint; with `ray.num_workers: [min, max]` the run is elastic
(it goes on with fewer workers when nodes leave and grows when they come back; what an epoch then
means is in docs/cluster.md). On a cluster of several nodes every path must reach every node:
the driver refuses local stores, storage and MLflow paths at start (`check_paths_are_shared`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

from pipeline.common.config import ConfigError, ExperimentConfig, config_from_dict, to_dict
from pipeline.common.files import read_json, resolve_storage, write_json
from pipeline.common.services import cluster_address, connect_ray
from pipeline.common.store import TaskStore
from pipeline.common.tracking import TrackedRun, check_tracking_server, resolve_tracking_uri
from pipeline.train import mlflow_run
from pipeline.train.build import open_stores
from pipeline.train.loop import RunContext, train_fn_per_worker

log = logging.getLogger(__name__)

RECORD_FILE = "uniseg_run.json"


class RunExistsError(RuntimeError):
    """A new run would overwrite (or repeat) an existing one."""


@dataclass
class RunRecord:
    name: str
    status: str  # running | finished | failed | stopped
    mlflow_run_id: str | None
    tracking_uri: str
    epochs_done: int
    config: dict[str, Any]
    checkpoint: str | None = None
    model_uri: str | None = None


@dataclass(frozen=True)
class TrainResult:
    name: str
    run_dir: str
    checkpoint: str | None
    mlflow_run_id: str | None
    model_uri: str | None
    metrics: dict[str, Any]


def run(cfg: ExperimentConfig, resume: bool = False, context: RunContext | None = None) -> TrainResult:
    """Train `cfg` (or continue it when `resume`); returns where the results are. The tracking
    server is probed before Ray starts."""
    storage = resolve_storage(cfg.ray.storage_path)
    run_dir = f"{storage.rstrip('/')}/{cfg.name}"
    previous = check_run(cfg, run_dir, resume)
    if previous is not None and previous.status == "finished" and previous.epochs_done >= cfg.train.epochs:
        log.info("run %s already finished %d epochs; nothing to do (raise train.epochs to train longer)",
                 cfg.name, previous.epochs_done)
        return TrainResult(cfg.name, run_dir, previous.checkpoint, previous.mlflow_run_id, previous.model_uri, {})
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    check_tracking_server(tracking_uri, cfg.mlflow)
    connect_ray(cfg.ray.address, cfg.ray.host)
    check_paths_are_shared(cfg, storage, tracking_uri, cluster_nodes(cfg))
    check_stores(cfg)
    record = open_run(cfg, run_dir, previous)
    context = RunContext(tracking_uri=record.tracking_uri, mlflow_run_id=record.mlflow_run_id,
                         **{k: v for k, v in asdict(context or RunContext()).items() if k.startswith("fail")})
    try:
        result = fit(cfg, storage, context)
    except BaseException as err:
        close_run(run_dir, record, "stopped" if isinstance(err, KeyboardInterrupt) else "failed")
        raise
    return finish_run(cfg, run_dir, record, result, storage)


def check_run(cfg: ExperimentConfig, run_dir: str, resume: bool) -> RunRecord | None:
    """The record of the run to resume; errors when a new run would reuse an existing folder."""
    record = read_record(run_dir)
    if not resume and (record is not None or _exists(run_dir)):
        status = record.status if record else "unknown status"
        raise RunExistsError(
            f"{run_dir}: run {cfg.name!r} already exists ({status}); continue it with --resume {cfg.name} "
            f"or start a new one with --set name=<new name>"
        )
    if resume and record is None:
        raise FileNotFoundError(f"{run_dir}: no run {cfg.name!r} to resume")
    return record


def open_run(cfg: ExperimentConfig, run_dir: str, previous: RunRecord | None) -> RunRecord:
    """Start (or reopen) the MLflow run and mark the run folder as running."""
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    run_id = mlflow_run.start_run(cfg, tracking_uri, previous.mlflow_run_id if previous else None).run_id
    record = RunRecord(cfg.name, "running", run_id, tracking_uri, previous.epochs_done if previous else 0, to_dict(cfg))
    write_record(run_dir, record)
    log.info("run %s: storage %s, MLflow run %s at %s", cfg.name, run_dir, run_id, tracking_uri)
    return record


def close_run(run_dir: str, record: RunRecord, status: str) -> None:
    record.status = status
    write_record(run_dir, record)
    TrackedRun(record.tracking_uri, record.mlflow_run_id).end("KILLED" if status == "stopped" else "FAILED")


def finish_run(cfg: ExperimentConfig, run_dir: str, record: RunRecord, result: Any, storage: str) -> TrainResult:
    """Log and register the final model from the last checkpoint; mark the run finished."""
    metrics = dict(result.metrics or {})
    record.epochs_done = int(metrics.get("epoch", record.epochs_done - 1)) + 1
    if result.checkpoint is not None:
        record.checkpoint = checkpoint_uri(result.checkpoint.path, storage)
        with result.checkpoint.as_directory() as model_dir:
            record.model_uri = mlflow_run.log_final_model(TrackedRun(record.tracking_uri, record.mlflow_run_id),
                                                          model_dir, cfg.mlflow.registered_model)
    record.status = "finished"
    write_record(run_dir, record)
    TrackedRun(record.tracking_uri, record.mlflow_run_id).end("FINISHED")
    log.info("run %s finished: checkpoint %s, model %s", cfg.name, record.checkpoint, record.model_uri)
    return TrainResult(cfg.name, run_dir, record.checkpoint, record.mlflow_run_id, record.model_uri, metrics)


def fit(cfg: ExperimentConfig, storage: str, context: RunContext, callbacks: Sequence[Any] = ()) -> Any:
    """Build the TorchTrainer for the config and run it to the end (a ray.train.Result);
    `callbacks` go to its RunConfig (a Tune trial passes its report callback)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train.process_group import torch_config

    connect_ray(cfg.ray.address, cfg.ray.host)
    if context.mlflow_run_id:  # logged first: a Tune trial stopped at its report never runs the later callbacks
        callbacks = [mlflow_run.EpochMetricsCallback(context.tracking_uri, context.mlflow_run_id), *callbacks]
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"experiment": to_dict(cfg), "context": asdict(context)},
        torch_config=torch_config(cfg.ray.use_gpu),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker=worker_resources(cfg),
            elastic_resize_monitor_interval_s=cfg.ray.elastic_resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage,
            callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep),
        ),
    )
    return trainer.fit()


def worker_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one training worker reserves: CPUs, a GPU when `use_gpu`, and the custom resources."""
    return {"CPU": cfg.ray.cpus_per_worker} | ({"GPU": 1} if cfg.ray.use_gpu else {}) | cfg.ray.resources_per_worker


def cluster_nodes(cfg: ExperimentConfig) -> int:
    """Alive nodes of the connected Ray cluster; 2 when a joined cluster's nodes cannot hold the
    workers yet (an autoscaler will add nodes for them)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1 or not cluster_address(cfg.ray.address):
        return len(alive)
    room = ray.cluster_resources()
    need = {k: v * cfg.ray.worker_range[1] for k, v in worker_resources(cfg).items()}
    return 1 if all(room.get(k, 0) >= v for k, v in need.items()) else 2


def concurrent_runs(cfg: ExperimentConfig, wanted: int) -> int:
    """How many training runs of `cfg` (cross-validation folds, search trials) to start at once: on
    a local Ray, as many as its resources hold with their minimum workers and the trial driver's
    `tune.trial_cpus` each (at least 1; the others wait for a free slot instead of timing out
    asking for workers); on a joined cluster all `wanted`, since an autoscaler adds nodes for them."""
    import ray

    if cluster_address(cfg.ray.address):
        return wanted
    room = ray.cluster_resources()
    need = {k: v * cfg.ray.worker_range[0] for k, v in worker_resources(cfg).items()}
    need["CPU"] = need.get("CPU", 0.0) + cfg.tune.trial_cpus
    need = {k: v for k, v in need.items() if v > 0}
    return max(1, min([wanted, *(int(room.get(k, 0) // v) for k, v in need.items())]))


def check_paths_are_shared(cfg: ExperimentConfig, storage: str, tracking_uri: str, nodes: int) -> None:
    """On more than one node, refuse paths that only this machine has (one line per path), unless
    `ray.shared_filesystem` says every node mounts them at the same place."""
    if nodes < 2 or cfg.ray.shared_filesystem:
        return
    local = [("data.stores", s, "an s3:// URI") for s in cfg.data.stores if "://" not in s]
    if "://" not in storage:
        local.append(("ray.storage_path", storage, "an s3:// URI"))
    if tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
        local.append(("mlflow.tracking_uri", tracking_uri, "an MLflow server (http://HOST:5000)"))
    if local:
        raise ConfigError("\n".join(
            f"{key}: {path} is local, but the Ray cluster has {nodes} nodes: use {fix}, or set "
            f"ray.shared_filesystem=true if every node mounts it at the same path" for key, path, fix in local))


def checkpoint_uri(path: str, storage: str) -> str:
    """Ray gives checkpoint paths without the scheme of a remote storage; put it back."""
    if "://" in storage and "://" not in path:
        return f"{storage.split('://', 1)[0]}://{path}"
    return path


def check_stores(cfg: ExperimentConfig) -> list[TaskStore]:
    """Open every store on the driver first, so a bad store fails here and not on each worker."""
    try:
        stores = open_stores(cfg.data.stores, fold=cfg.data.fold, allow_incomplete=cfg.data.allow_incomplete_stores)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.stores: {err}") from None
    log.info("tasks: %s", ", ".join(f"{s.manifest.task_name} ({len(s.case_ids('train'))} train, "
                                    f"{len(s.case_ids('validation'))} validation)" for s in stores))
    return stores


def read_record(run_dir: str) -> RunRecord | None:
    raw = read_json(f"{run_dir}/{RECORD_FILE}")
    return None if raw is None else RunRecord(**raw)


def write_record(run_dir: str, record: RunRecord) -> None:
    write_json(f"{run_dir}/{RECORD_FILE}", asdict(record))


def _exists(run_dir: str) -> bool:
    fs, path = fsspec.core.url_to_fs(run_dir)
    return fs.exists(path)


def config_for_resume(run: str, overrides: list[str], storage_path: str | None = None) -> ExperimentConfig:
    """The config a stopped run was started with (plus `key=value` overrides).

    `run` is a run folder (local path or URI) or a run name under `storage_path` (default:
    the config default, outputs/ray).
    """
    from pipeline.common.config import RayConfig
    from pipeline.common.config_sources import apply_overrides

    storage_path = storage_path or next(
        (o.partition("=")[2] for o in overrides if o.startswith("ray.storage_path=")), None
    )
    run_dir = run if ("/" in run or "://" in run) else f"{resolve_storage(storage_path or RayConfig().storage_path)}/{run}"
    record = read_record(resolve_storage(run_dir))
    if record is None:
        raise ConfigError(f"{run_dir}: no run record ({RECORD_FILE}); give --config as well")
    raw = record.config
    raw["name"] = run_dir.rstrip("/").rsplit("/", 1)[-1]
    raw.setdefault("ray", {})["storage_path"] = run_dir.rstrip("/").rsplit("/", 1)[0] if "/" in run_dir else "."
    overridden = apply_overrides(raw, overrides)
    return config_from_dict(raw, source=f"{run_dir}/{RECORD_FILE}", overrides=overridden)
