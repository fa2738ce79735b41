"""Cross-validation on Ray: `python -m pipeline.train --config FILE --folds all|0,1,...`.

Fold k is a Ray Train run of the config with `data.fold: k` (it trains on the stores' other
folds and validates on fold k, pipeline/ingest/split.py), named `<name>-fold<k>` and kept under
`<ray.storage_path>/<name>/folds/`. The folds run as concurrent trials of one Ray Tune job over
a fold grid, sharing the cluster: a trial's driver reserves almost nothing (`tune.trial_cpus`),
its Train workers `ray.num_workers` x (`ray.cpus_per_worker`, a GPU with `ray.use_gpu`). On a
local Ray as many folds start at once as its resources hold (`run.concurrent_runs`) and the
others queue; on a joined cluster all start, and their workers wait for the autoscaler's nodes.

Failures: a fold that fails (a lost worker or node, an error) is retried as a whole, up to
`ray.max_failures` times, and each retry continues from that fold's last checkpoint (Ray Train
restores a run of the same name and storage path). Every fold's attempts, status and error are
recorded, logged and written into the summary; a fold still failed at the end fails the command
(exit status 1) after the summary of the others is written. `--resume NAME` runs the folds that
did not finish, each from its checkpoint, then summarises and registers.

After its training, each fold's final model segments its held-out cases (a Ray task with one
training worker's resources; sliding window on the store grid, no mirroring, as validation)
and scores them (pipeline.common.metrics, nnU-Net's empty-reference rule): the out-of-fold rows
(`folds/<name>-fold<k>/out_of_fold.json`) from which `cv_summary` computes per task and class the
mean and std over folds and the pooled Dice over all out-of-fold cases. A held-out case the fold's
model trained on (its card's `trained_cases`; a store re-ingested with other folds before a
`--resume`) is left out, logged by id.

MLflow: one parent run (the config, the summary as a table, cv_summary.{md,csv,png}, the
`cv/...` metrics, one `cv.fold<k>.*` tag set per fold) and one child run per fold (tag
`cv.fold`; its epoch metrics and plots). When every fold finished, the fold ensemble (one card,
`fold_<k>.safetensors`, pipeline.common.model_card) is logged to the parent run and registered
as `mlflow.registered_model`. Run record: `<storage>/<name>/uniseg_cv.json`.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from pipeline.common.config import ConfigError, ExperimentConfig, config_from_dict, to_dict
from pipeline.common.files import read_json, resolve_storage, write_json
from pipeline.common.inference import InferenceOptions, label_map, predict_probabilities
from pipeline.common.metrics import class_metrics
from pipeline.common.model_card import (
    CARD_FILE, WEIGHTS_FILE, ModelCard, build_from_card, unseen_cases, write_ensemble_dir,
)
from pipeline.common.services import connect_ray
from pipeline.common.store import TaskStore
from pipeline.common.tracking import TrackedRun, check_tracking_server, resolve_tracking_uri
from pipeline.common.trials import child_run, trial_resources
from pipeline.train import mlflow_run
from pipeline.train.cv_summary import OutOfFoldRow, mlflow_metrics, overall, summarise, write_summary
from pipeline.train.loop import RunContext
from pipeline.train.run import (
    RunExistsError, check_paths_are_shared, check_stores, checkpoint_uri, cluster_nodes, concurrent_runs, fit,
)

log = logging.getLogger(__name__)

CV_RECORD = "uniseg_cv.json"
FOLD_STATE_FILE = "fold.json"
OUT_OF_FOLD = "out_of_fold.json"
FOLD_TAG = "cv.fold"
SUMMARY_ARTIFACTS = "cross_validation"


class CrossValidationError(RuntimeError):
    """Some folds failed after their retries (the summary of the others is written)."""


@dataclass
class FoldOutcome:
    fold: int
    status: str  # finished | failed
    attempts: int
    run_id: str | None
    checkpoint: str | None
    error: str | None = None


@dataclass(frozen=True)
class CrossValidationResult:
    name: str
    run_dir: str
    parent_run_id: str
    folds: list[FoldOutcome]
    summary: list[Any]  # cv_summary.CvRow
    model_uri: str | None
    files: list[str]  # the summary files under <run_dir>/cross_validation


def run_cv(cfg: ExperimentConfig, folds: Sequence[int] | None = None, resume: bool = False,
           fold_context: Mapping[int, RunContext] | None = None) -> CrossValidationResult:
    """Cross-validate `cfg` over `folds` (None: every fold of the stores); see the module docstring.
    `fold_context` adds RunContext fields to a fold's run (fault injection in tests)."""
    storage = resolve_storage(cfg.ray.storage_path)
    run_dir = f"{storage.rstrip('/')}/{cfg.name}"
    record = _check_run_dir(run_dir, cfg.name, resume)
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    check_tracking_server(tracking_uri, cfg.mlflow)
    chosen = choose_folds(check_stores(cfg), folds if record is None else record["folds"])
    parent_id = record["parent_run_id"] if record else _start_cv_run(cfg, tracking_uri, chosen)
    outcomes = {o["fold"]: FoldOutcome(**o) for o in (record or {}).get("outcomes", [])}
    _write_record(run_dir, cfg, parent_id, chosen, outcomes, "running")
    connect_ray(cfg.ray.address, cfg.ray.host)
    check_paths_are_shared(cfg, storage, tracking_uri, cluster_nodes(cfg))
    todo = [f for f in chosen if f not in outcomes or outcomes[f].status != "finished"]
    log.info("cross-validation %s: folds %s (%s to run) on Ray; MLflow parent run %s", cfg.name,
             ", ".join(map(str, chosen)), ", ".join(map(str, todo)) or "none", parent_id)
    try:
        if todo:
            outcomes |= _run_folds(cfg, todo, run_dir, parent_id, tracking_uri, fold_context or {})
    except BaseException:
        _write_record(run_dir, cfg, parent_id, chosen, outcomes, "stopped")
        TrackedRun(tracking_uri, parent_id).end("KILLED")
        raise
    return _finish(cfg, chosen, [outcomes[f] for f in chosen], run_dir, parent_id, tracking_uri)


def choose_folds(stores: Sequence[TaskStore], requested: Sequence[int] | None) -> list[int]:
    """`requested`, or every fold: as many as the store with the most folds has (a store with
    fewer holds nothing out in the others and trains on all its cases there)."""
    count = max(len(s.manifest.folds) for s in stores)
    if count < 2:
        raise ConfigError("data.stores: cross-validation needs stores with two folds or more "
                          "(re-ingest with --folds K; a store needs two labelled cases)")
    for store in stores:
        if len(store.manifest.folds) < count:
            log.warning("%s has %d folds, fewer than %d: it holds nothing out in folds %d..%d", store.uri,
                        len(store.manifest.folds), count, len(store.manifest.folds), count - 1)
    unknown = sorted(set(requested or ()) - set(range(count)))
    if unknown:
        raise ConfigError(f"--folds: no fold {', '.join(map(str, unknown))}; the stores have folds 0..{count - 1}")
    return sorted(set(requested)) if requested is not None else list(range(count))


def fold_config(cfg: ExperimentConfig, fold: int) -> ExperimentConfig:
    """Fold `fold`'s run: named `<name>-fold<k>`, validating on that fold, not registered, and not
    restarting workers itself (the trial is retried as a whole, from its checkpoint)."""
    raw = to_dict(cfg)
    raw["name"] = f"{cfg.name}-fold{fold}"
    raw["data"]["fold"] = fold
    raw["ray"]["max_failures"] = 0
    raw["mlflow"]["registered_model"] = None
    return config_from_dict(raw, source=f"fold {fold} of {cfg.name}")


def fold_driver_fn(params: dict[str, Any], base: dict[str, Any], parent_run_id: str, tracking_uri: str,
                   run_dir: str, contexts: dict[int, dict[str, Any]]) -> None:
    """One Tune trial: fold `params["fold"]` trained (resumed from its checkpoint on a retry),
    then its held-out cases scored by its final model."""
    from ray.tune.integration.ray_train import TuneReportCallback

    fold = int(params["fold"])
    cfg = fold_config(config_from_dict(base, source="cross-validation base"), fold)
    fold_dir = f"{run_dir}/folds/{cfg.name}"
    state = read_json(f"{fold_dir}/{FOLD_STATE_FILE}") or {"fold": fold, "attempts": 0}
    run, _ = child_run(cfg, TrackedRun(tracking_uri, parent_run_id), (FOLD_TAG, str(fold)), {"stage": "cv-fold"})
    state |= {"attempts": state["attempts"] + 1, "run_id": run.run_id}
    write_json(f"{fold_dir}/{FOLD_STATE_FILE}", state)
    if state["attempts"] > 1:
        log.warning("fold %d: attempt %d, continuing from its last checkpoint", fold, state["attempts"])
    context = RunContext(**{**contexts.get(fold, {}), "tracking_uri": tracking_uri, "mlflow_run_id": run.run_id})
    try:
        result = fit(cfg, f"{run_dir}/folds", context, callbacks=[TuneReportCallback()])
        with result.checkpoint.as_directory() as directory:
            rows = score_held_out(cfg, Path(directory), fold)
    except BaseException:
        run.end("FAILED")
        raise
    write_json(f"{fold_dir}/{OUT_OF_FOLD}", [asdict(r) for r in rows])
    write_json(f"{fold_dir}/{FOLD_STATE_FILE}", state | {"checkpoint": checkpoint_uri(result.checkpoint.path, run_dir)})
    run.end("FINISHED")


def score_held_out(cfg: ExperimentConfig, model_dir: Path, fold: int) -> list[OutOfFoldRow]:
    """The fold's held-out cases of every store, segmented by the model in `model_dir` in a Ray
    task with one training worker's resources."""
    import ray

    # Outside the trial's placement group (it holds only the trial driver's share).
    task = ray.remote(_score_cases).options(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0,
                                            scheduling_strategy="DEFAULT")
    return ray.get(task.remote((model_dir / WEIGHTS_FILE).read_bytes(), (model_dir / CARD_FILE).read_text(),
                               list(cfg.data.stores), fold, cfg.train.precision != "fp32"))


def _score_cases(weights: bytes, card_json: str, stores: list[str], fold: int, amp: bool) -> list[OutOfFoldRow]:
    import torch
    from safetensors.torch import load as load_weights

    card = ModelCard.from_json(card_json)
    network = build_from_card(card)
    network.load_state_dict(load_weights(weights))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = network.to(device).eval()
    options = InferenceOptions(amp=amp)
    rows = []
    for task_id, uri in enumerate(stores):
        store = TaskStore.open(uri, fold=fold)
        task = card.tasks[task_id]
        for case in unseen_cases(card, task.name, store.case_ids("validation"), uri):
            image, label = store.read_case(case)
            probabilities = predict_probabilities(network, torch.from_numpy(np.asarray(image, np.float32)), task_id,
                                                  task.num_classes, card.spec.patch_size, options)
            predicted = label_map(probabilities).numpy()
            for m in class_metrics(predicted, label, task.labels, store.case_meta(case).spacing):
                rows.append(OutOfFoldRow(fold, task.name, case, m.class_id, m.name, m.dice, m.false_positives,
                                         m.false_negatives))
    return rows


def _run_folds(cfg: ExperimentConfig, folds: list[int], run_dir: str, parent_id: str, tracking_uri: str,
               contexts: Mapping[int, RunContext]) -> dict[int, FoldOutcome]:
    """The folds as one Tune job (a trial per fold, as many at once as `concurrent_runs` allows); their outcomes."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(fold_driver_fn, base=to_dict(cfg), parent_run_id=parent_id, tracking_uri=tracking_uri,
                             run_dir=run_dir, contexts={k: _fault_fields(v) for k, v in contexts.items()}),
        trial_resources(cfg),
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"fold": tune.grid_search(folds)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_runs(cfg, len(folds))),
        run_config=tune.RunConfig(name="tune", storage_path=run_dir, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    results = tuner.fit()
    outcomes = {}
    for position, result in enumerate(results):
        # A trial lost before it started (its actor killed, e.g. out of memory) has no config;
        # results come in the order of the fold grid.
        fold = int((result.config or {}).get("fold", folds[position]))
        state = read_json(f"{run_dir}/folds/{cfg.name}-fold{fold}/{FOLD_STATE_FILE}") or {}
        error = None if result.error is None else _error_line(result.error)
        finished = error is None and state.get("checkpoint") is not None
        outcomes[fold] = FoldOutcome(fold, "finished" if finished else "failed", int(state.get("attempts", 0)),
                                     state.get("run_id"), state.get("checkpoint"), error)
    return outcomes


def _finish(cfg: ExperimentConfig, folds: list[int], outcomes: list[FoldOutcome], run_dir: str, parent_id: str,
            tracking_uri: str) -> CrossValidationResult:
    """Summary of the finished folds (table, plot, metrics), the failures reported, the ensemble registered."""
    parent = TrackedRun(tracking_uri, parent_id)
    finished = [o for o in outcomes if o.status == "finished"]
    rows = [OutOfFoldRow(**r) for o in finished for r in read_json(f"{run_dir}/folds/{cfg.name}-fold{o.fold}/{OUT_OF_FOLD}")]
    done = [o.fold for o in finished]
    summary = summarise(rows, done)
    notes = [_describe(o, cfg.ray.max_failures) for o in outcomes if o.status != "finished" or o.attempts > 1]
    files = _write_summary(cfg, summary, done, notes, run_dir, parent)
    parent.set_tags({f"cv.fold{o.fold}.{key}": value for o in outcomes
                     for key, value in (("status", o.status), ("attempts", o.attempts))})
    for note in notes:
        log.warning("%s", note)
    mean, std, pooled = overall(summary)
    log.info("cross-validation %s: mean Dice %.4f +- %.4f over %d folds, pooled %.4f; summary in %s", cfg.name,
             mean, std, len(done), pooled, f"{run_dir}/{SUMMARY_ARTIFACTS}")
    failed = [o for o in outcomes if o.status != "finished"]
    model_uri = None if failed else _register(cfg, finished, parent, summary)
    status = "failed" if failed else "finished"
    _write_record(run_dir, cfg, parent_id, folds, {o.fold: o for o in outcomes}, status, model_uri)
    parent.end("FAILED" if failed else "FINISHED")
    if failed:
        raise CrossValidationError("; ".join(_describe(o, cfg.ray.max_failures) for o in failed)
                                   + f"; continue with --resume {cfg.name}")
    return CrossValidationResult(cfg.name, run_dir, parent_id, outcomes, summary, model_uri, files)


def _write_summary(cfg: ExperimentConfig, summary: list[Any], folds: list[int], notes: list[str], run_dir: str,
                   parent: TrackedRun) -> list[str]:
    """cv_summary.{csv,md,png} to the run folder and the parent run (with the table and metrics)."""
    title = f"Cross-validation of {cfg.name}: Dice on held-out cases, folds {', '.join(map(str, folds))}"
    fs, root = fsspec.core.url_to_fs(f"{run_dir}/{SUMMARY_ARTIFACTS}")
    fs.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        written = write_summary(summary, folds, Path(tmp), title, notes)
        for path in written:
            fs.put_file(str(path), f"{root}/{path.name}")
            parent.log_file(path, SUMMARY_ARTIFACTS)
    parent.log_table({k: [_cell(getattr(r, k)) for r in summary] for k in
                      ("task", "class_id", "name", "mean", "std", "pooled", "cases")},
                     f"{SUMMARY_ARTIFACTS}/cv_summary_table.json")
    parent.log_metrics(mlflow_metrics(summary))
    return [f"{run_dir}/{SUMMARY_ARTIFACTS}/{p.name}" for p in written]


def _register(cfg: ExperimentConfig, finished: list[FoldOutcome], parent: TrackedRun, summary: list[Any]) -> str:
    """The fold ensemble, logged to the parent run and registered as `mlflow.registered_model`."""
    mean, std, pooled = overall(summary)
    metadata = {"run": cfg.name, "folds": [o.fold for o in finished],
                "cross_validation": {"dice_mean": mean, "dice_std": std, "dice_pooled": pooled}}
    with tempfile.TemporaryDirectory() as tmp:
        fold_dirs = {}
        for outcome in finished:
            fs, path = fsspec.core.url_to_fs(outcome.checkpoint)
            local = Path(tmp) / f"fold{outcome.fold}"
            local.mkdir()
            for name in (WEIGHTS_FILE, CARD_FILE):
                fs.get_file(f"{path}/{name}", str(local / name))
            fold_dirs[outcome.fold] = local
        ensemble = write_ensemble_dir(fold_dirs, Path(tmp) / "ensemble", metadata)
        model_uri = mlflow_run.log_final_model(parent, ensemble, cfg.mlflow.registered_model)
    log.info("registered the ensemble of folds %s: %s", ", ".join(str(o.fold) for o in finished), model_uri)
    return model_uri


def _start_cv_run(cfg: ExperimentConfig, tracking_uri: str, folds: list[int]) -> str:
    run = mlflow_run.start_run(cfg, tracking_uri)
    run.set_tags({"stage": "cross-validation"})
    run.log_params({"cv.folds": ",".join(map(str, folds))})
    return run.run_id


def _check_run_dir(run_dir: str, name: str, resume: bool) -> dict[str, Any] | None:
    """The record of the cross-validation to resume; errors when a new one would reuse a folder."""
    record = read_json(f"{run_dir}/{CV_RECORD}")
    fs, path = fsspec.core.url_to_fs(run_dir)
    if not resume and (record is not None or fs.exists(path)):
        raise RunExistsError(f"{run_dir}: run {name!r} already exists; continue it with --resume {name} "
                             f"or start a new one with --set name=<new name>")
    if resume and record is None:
        raise FileNotFoundError(f"{run_dir}: no cross-validation {name!r} to resume ({CV_RECORD} missing)")
    return record


def _write_record(run_dir: str, cfg: ExperimentConfig, parent_id: str, folds: list[int],
                  outcomes: Mapping[int, FoldOutcome], status: str, model_uri: str | None = None) -> None:
    write_json(f"{run_dir}/{CV_RECORD}", {
        "name": cfg.name, "status": status, "parent_run_id": parent_id, "folds": folds,
        "outcomes": [asdict(outcomes[f]) for f in folds if f in outcomes], "model_uri": model_uri,
        "config": to_dict(cfg),
    })


def _fault_fields(context: RunContext) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(context).items() if k.startswith("fail")}


def _describe(outcome: FoldOutcome, max_failures: int) -> str:
    if outcome.status == "finished":
        return f"fold {outcome.fold} failed {outcome.attempts - 1} time(s) and finished from its checkpoint"
    return (f"fold {outcome.fold} failed after {outcome.attempts} attempt(s) (ray.max_failures={max_failures}): "
            f"{outcome.error}")


def _error_line(error: BaseException) -> str:
    """A trial's error in one line: the exception raised in the trial (the last line of a Ray task
    error's traceback), or the first line of an error of Ray itself (e.g. workers killed for memory)."""
    from ray.exceptions import RayTaskError

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return (lines[-1] if isinstance(error, RayTaskError) else f"{type(error).__name__}: {lines[0]}")[:400]


def _cell(value: Any) -> Any:
    return None if isinstance(value, float) and not np.isfinite(value) else value
