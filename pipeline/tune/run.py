"""The search driver: a Ray Tune Tuner over trial drivers that each run a short Ray Train job.

Layout under `<ray.storage_path>/<name>`: Tune's experiment state (so `Tuner.restore` resumes
an interrupted search, only when asked: `resume=True`), `uniseg_tune.json` (the MLflow parent run id), and `trials/`, where each
trial's TorchTrainer keeps its checkpoints under the trial's name `<name>-<trial id>` (so a
trial restarted by a resumed search continues its Train run). MLflow: one parent run (search
space, best metric, best config) and one child run per trial (tag mlflow.parentRunId), into
which the trial's rank 0 logs its epoch metrics.

Resuming unpickles Tune's state (`tuner.pkl`, the trials' state): code runs on the driver as
whoever wrote those files wished. So a search is never resumed implicitly: a new search refuses
a folder that exists, before Ray starts or anything there is read, and `--resume` is for
searches you (or people you trust with your account) wrote.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec

from pipeline.common.config import ExperimentConfig, config_from_dict, save_config, to_dict
from pipeline.common.files import read_json, resolve_storage, write_json
from pipeline.common.services import connect_ray
from pipeline.common.tracking import TrackedRun, check_tracking_server, resolve_tracking_uri
from pipeline.common.trials import child_run, trial_resources
from pipeline.train.loop import RunContext
from pipeline.train.run import concurrent_runs, fit
from pipeline.tune.space import apply_values, sampled_values, search_space, trial_config

log = logging.getLogger(__name__)

RECORD_FILE = "uniseg_tune.json"
TRIAL_TAG = "tune.trial_id"


class SearchError(ValueError):
    """A search that cannot start as asked (bad input: exit status 2, one line)."""


@dataclass(frozen=True)
class TuneResult:
    name: str
    search_dir: str
    parent_run_id: str
    best_config_path: str
    best_metric: float
    best_values: dict[str, Any]
    trials: int
    stopped_early: int


def run(cfg: ExperimentConfig, resume: bool = False) -> TuneResult:
    """Search `cfg.tune.space` around `cfg`, or continue the interrupted search when `resume`."""
    from ray import tune

    if not cfg.tune.space:
        raise SearchError("tune.space is empty: give at least one dotted key to search, e.g. train.learning_rate")
    storage = resolve_storage(cfg.ray.storage_path)
    search_dir = f"{storage.rstrip('/')}/{cfg.name}"
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    restorable = check_search_dir(search_dir, cfg.name, resume)
    check_tracking_server(tracking_uri, cfg.mlflow)
    connect_ray(cfg.ray.address, cfg.ray.host)
    record = read_json(f"{search_dir}/{RECORD_FILE}") if restorable else None
    parent_id = record["parent_run_id"] if record else _start_search_run(cfg, tracking_uri)
    write_json(f"{search_dir}/{RECORD_FILE}", {"parent_run_id": parent_id, "tracking_uri": tracking_uri, "config": to_dict(cfg)})
    trainable = tune.with_resources(
        tune.with_parameters(train_driver_fn, base=to_dict(cfg), parent_run_id=parent_id, tracking_uri=tracking_uri,
                             trial_storage=f"{search_dir}/trials"),
        trial_resources(cfg),
    )
    if restorable:
        log.info("resuming search %s from %s", cfg.name, search_dir)
        tuner = tune.Tuner.restore(search_dir, trainable, resume_errored=True)
    else:
        concurrent = cfg.tune.max_concurrent_trials or concurrent_runs(cfg, cfg.tune.num_samples)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg.tune),
            tune_config=tune.TuneConfig(num_samples=cfg.tune.num_samples, max_concurrent_trials=concurrent,
                                        scheduler=_scheduler(cfg), search_alg=_searcher(cfg)),
            run_config=tune.RunConfig(name=cfg.name, storage_path=storage, verbose=0),
        )
    try:
        results = tuner.fit()
    except BaseException:
        TrackedRun(tracking_uri, parent_id).end("KILLED")
        raise
    return _finish(cfg, results, search_dir, parent_id, tracking_uri)


def check_search_dir(search_dir: str, name: str, resume: bool) -> bool:
    """Whether to restore: True with `resume` and Tune state there; False for a new search in a
    folder that does not exist. Anything else is an error (nothing in the folder is read)."""
    from ray import tune

    fs, path = fsspec.core.url_to_fs(search_dir)
    if not resume:
        if fs.exists(path):
            raise SearchError(f"{search_dir}: search {name!r} already exists; continue it with --resume "
                              f"(this unpickles its saved state) or start a new one with --set name=<new name>")
        return False
    if not tune.Tuner.can_restore(search_dir):
        raise SearchError(f"{search_dir}: no search {name!r} to resume")
    return True


def train_driver_fn(trial_params: dict[str, Any], base: dict[str, Any], parent_run_id: str, tracking_uri: str,
                    trial_storage: str) -> None:
    """One trial: a TorchTrainer over the sampled config whose worker reports reach Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    base_cfg = config_from_dict(base, source="tune base")
    trial_id = tune.get_context().get_trial_id()
    values = sampled_values(trial_params, base_cfg.tune)
    cfg = trial_config(base_cfg, values, f"{base_cfg.name}-{trial_id}", source=f"trial {trial_id}")
    run = _child_run(cfg, values, trial_id, TrackedRun(tracking_uri, parent_run_id))
    fit(cfg, trial_storage, RunContext(tracking_uri=tracking_uri, mlflow_run_id=run.run_id),
        callbacks=[TuneReportCallback()])
    run.end("FINISHED")


def _scheduler(cfg: ExperimentConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", metric=cfg.tune.metric, mode=cfg.tune.mode,
                         max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor)


def _searcher(cfg: ExperimentConfig) -> Any:
    if cfg.tune.searcher == "random":
        return None  # Tune's random / grid variant generator
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=cfg.tune.metric, mode=cfg.tune.mode, seed=cfg.tune.seed)


def _start_search_run(cfg: ExperimentConfig, tracking_uri: str) -> str:
    params = {f"space.{key}": json.dumps({k: v for k, v in asdict(param).items() if v is not None})
              for key, param in cfg.tune.space.items()}
    params |= {f"tune.{key}": getattr(cfg.tune, key) for key in ("num_samples", "max_concurrent_trials", "scheduler",
               "grace_period", "reduction_factor", "searcher", "metric", "mode", "seed")}
    run = TrackedRun.create(tracking_uri, cfg.mlflow.experiment, cfg.name, tags={"stage": "tune"}, params=params)
    run.log_dict(to_dict(cfg), "config/base.json")
    return run.run_id


def _child_run(cfg: ExperimentConfig, values: dict[str, Any], trial_id: str, parent: TrackedRun) -> TrackedRun:
    """The trial's MLflow run (reopened when a resumed search restarts the trial)."""
    run, created = child_run(cfg, parent, (TRIAL_TAG, trial_id), {"stage": "tune-trial"})
    if created:
        run.log_dict(values, "trial/values.json")
    return run


def _finish(cfg: ExperimentConfig, results: Any, search_dir: str, parent_id: str, tracking_uri: str) -> TuneResult:
    """Close the child runs, pick the best trial, write its config, log it to the parent run."""
    parent = TrackedRun(tracking_uri, parent_id)
    children = parent.children(TRIAL_TAG)
    scored, stopped = [], 0
    for result in results:
        trial_id = Path(result.path).name.split("_")[1] if result.path else None
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id", trial_id)
        epochs = int(metrics.get("training_iteration", 0))
        early = result.error is None and epochs < cfg.train.epochs
        stopped += early
        child = children.get(trial_id)
        if child is not None:
            child.set_tags({"tune.stopped_early": str(early).lower(), "tune.epochs": epochs})
            child.end("FAILED" if result.error is not None else ("KILLED" if early else "FINISHED"))
        value = metrics.get(cfg.tune.metric)
        if value is not None and math.isfinite(value):
            scored.append((not early, value if cfg.tune.mode == "max" else -value, result))
    if not scored:
        parent.end("FAILED")
        raise RuntimeError(f"{search_dir}: no trial reported {cfg.tune.metric}")
    # Trials that ran every epoch first (a stopped trial's metric is from fewer epochs).
    _, _, best = max(scored, key=lambda s: (s[0], s[1]))
    values = sampled_values(best.config, cfg.tune)
    best_cfg = config_from_dict(apply_values(cfg, values) | {"name": f"{cfg.name}-best"}, source="best trial")
    path = Path(cfg.tune.best_config).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(best_cfg, path)
    best_metric = float(best.metrics[cfg.tune.metric])
    parent.log_metrics({f"best/{cfg.tune.metric}": best_metric})
    parent.log_file(path, "best")
    parent.set_tags({"tune.best_trial": best.metrics.get("trial_id")})
    parent.end("FINISHED")
    log.info("search %s: %d trials (%d stopped early), best %s = %.4f with %s; config: %s", cfg.name, len(results),
             stopped, cfg.tune.metric, best_metric, values, path)
    return TuneResult(cfg.name, search_dir, parent_id, str(path), best_metric, values, len(results), stopped)

