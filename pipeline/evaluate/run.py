"""`pipeline.evaluate`: per-task, per-class Dice and HD95 of a model on the stores' split.

For each store: the model task of the same name (the store's task name or dataset folder),
the split's cases, one prediction per case (sliding window on the stored image), scored in the
chosen space (`pipeline.evaluate.cases`). Then the report (`pipeline.evaluate.report`) goes to
the output folder and, when the model came from MLflow, to the model's run.

The train and validation splits are those of the cross-validation fold the model held out in
training (its card's `held_out_folds`: `data.fold`, or the one fold of an ensemble picked with
`--folds k`; fold 0 for a model trained on the stores' default split). A fold ensemble of
several folds has no such split: every fold trained on the others' validation cases.

Of the validation and test splits, the cases the model trained on (its card's `trained_cases`)
are left out, logged by id and counted in the report's title: a store ingested anew (`--overwrite`,
another machine, a case fewer) may have drawn other folds than the one the model trained with.
When none is left, EvaluateError (exit status 2). A card without the record scores the split
as the store draws it (logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from pipeline.common.cli import output_folder_problem
from pipeline.common.inference import InferenceOptions, resolve_device
from pipeline.common.metrics import EmptyRule
from pipeline.common.mlflow_model import load_model, model_run
from pipeline.common.model_card import ModelCard, TaskCard, unseen_cases
from pipeline.common.store import StoreError, TaskStore
from pipeline.common.tracking import check_model_tracking, use_tracking_uri
from pipeline.evaluate.cases import EvaluateError, Space, evaluate_case
from pipeline.evaluate.report import CaseRow, mlflow_metrics, overall_dice, write_report
from pipeline.evaluate.slices import SliceExample, write_slices

log = logging.getLogger(__name__)
SPLIT_ALIASES = {"val": "validation"}
EXAMPLES_PER_TASK = 3  # cases shown in each task's slices_<task>.png


@dataclass(frozen=True)
class EvaluateOptions:
    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a model folder
    stores: tuple[str, ...]
    output: Path
    split: str = "validation"  # train | validation (val) | test
    space: Space = "original"
    raw_root: Path | None = None  # folder of the raw datasets, when moved since ingest
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    device: str = "auto"
    tracking_uri: str | None = None
    log_to_mlflow: bool = True
    storage_options: dict[str, Any] | None = None
    folds: tuple[int, ...] | None = None  # of a fold ensemble, the folds to average (None: all)
    empty: EmptyRule = "nnunet"  # Dice rule for a reference without the class (pipeline.common.metrics)


@dataclass(frozen=True)
class Evaluation:
    rows: list[CaseRow]
    files: list[Path]
    metrics: dict[str, float]
    run_id: str | None  # the MLflow run the report was logged to


def run(options: EvaluateOptions) -> Evaluation:
    tracking_uri = use_tracking_uri(options.tracking_uri)
    check_model_tracking(options.model)
    split = SPLIT_ALIASES.get(options.split, options.split)
    network, card = _load(options.model, options.device, options.folds)
    fold = None if split == "test" else held_out_fold(card, options.split)
    stores = [_open(uri, options.storage_options, fold) for uri in options.stores]
    plan = []
    for store in stores:
        task_id = _task_id(card, store)
        case_ids = _cases(store, split, fold)
        plan.append((store, task_id, case_ids, _untrained(card, card.tasks[task_id].name, store.uri, split, case_ids)))
    problem = output_folder_problem(str(options.output))
    if problem:
        raise EvaluateError(problem)
    rows, examples = [], {}
    for store, task_id, _, case_ids in plan:
        task_rows, task_examples = _evaluate_store(network, card, task_id, store, case_ids, options)
        rows += task_rows
        if task_examples:
            examples[card.tasks[task_id].name] = task_examples
    of_fold = "" if fold is None else f" of fold {fold}"
    excluded = sum(len(split_ids) - len(scored) for _, _, split_ids, scored in plan)
    left_out = f"; {excluded} case(s) the model trained on left out" if excluded else ""
    title = f"Evaluation of {options.model} on the {split} split{of_fold} ({options.space} space{left_out})"
    summaries, files = write_report(rows, options.output, title)
    files += write_slices(examples, {t.name: t.labels for t in card.tasks}, options.output)
    metrics = mlflow_metrics(summaries, split)
    log.info("mean Dice over %d task(s): %.4f; report in %s", len(stores), overall_dice(summaries), options.output)
    run_id = _log(options, metrics, split, tracking_uri)
    return Evaluation(rows, files, metrics, run_id)


def _evaluate_store(
    network: nn.Module, card: ModelCard, task_id: int, store: TaskStore, case_ids: list[str], options: EvaluateOptions
) -> tuple[list[CaseRow], list[SliceExample]]:
    task = card.tasks[task_id].name
    rows, examples = [], []
    for case_id in tqdm(case_ids, desc=task, disable=None):
        try:
            result = evaluate_case(network, card, task_id, store, case_id, options.inference, options.space,
                                   options.raw_root, options.empty)
        except StoreError as err:  # a corrupt chunk: bad input, named by store, case and array
            raise EvaluateError(str(err)) from None
        rows += [CaseRow(task, case_id, m) for m in result.metrics]
        if result.example is not None and len(examples) < EXAMPLES_PER_TASK:
            examples.append(result.example)
    return rows, examples


def _load(uri: str, device: str, folds: tuple[int, ...] | None) -> tuple[nn.Module, ModelCard]:
    try:
        return load_model(uri, resolve_device(device), folds)
    except (FileNotFoundError, ValueError) as err:
        raise EvaluateError(str(err)) from None


def held_out_fold(card: ModelCard, split: str) -> int | None:
    """The fold whose cases the model held out in training, which `split` (train or validation)
    is taken from; None: the stores' default split (fold 0). EvaluateError for an ensemble of
    several folds."""
    folds = card.held_out_folds
    if len(folds) > 1:
        raise EvaluateError(
            f"--split {split}: every fold of this ensemble (folds {', '.join(map(str, folds))}) saw the others' "
            "validation cases in training; use --split test, or --folds k to score fold k's held-out cases with "
            "that fold's weights")
    if folds:
        log.info("the %s split is that of fold %d, the fold the model held out in training", split, folds[0])
    return folds[0] if folds else None


def _open(uri: str, storage_options: dict[str, Any] | None, fold: int | None) -> TaskStore:
    try:
        return TaskStore.open(uri, storage_options, fold=fold)
    except StoreError as err:
        raise EvaluateError(str(err)) from None


def _task_id(card: ModelCard, store: TaskStore) -> int:
    names = [t.name for t in card.tasks]
    for name in (store.manifest.task_name, store.manifest.dataset):
        if name in names:
            _check_channels(card.tasks[names.index(name)], store)
            return names.index(name)
    raise EvaluateError(
        f"{store.uri}: task {store.manifest.task_name!r} is not a task of this model ({', '.join(names)})"
    )


def _check_channels(task: TaskCard, store: TaskStore) -> None:
    """The store's channels must be the model task's (count and modalities), before any inference."""
    stored, expected = store.manifest.modalities, task.modalities
    if [m.upper() for m in stored] != [m.upper() for m in expected]:
        raise EvaluateError(f"{store.uri}: {len(stored)} channel(s) ({', '.join(stored)}), but the model's task "
                            f"{task.name} takes {len(expected)} ({', '.join(expected)})")


def _cases(store: TaskStore, split: str, fold: int | None) -> list[str]:
    try:
        case_ids = store.case_ids(split)
    except ValueError as err:
        raise EvaluateError(f"{store.uri}: {err}") from None
    if not case_ids:
        of_fold = "" if fold is None else f" of fold {fold} (the store has {len(store.manifest.folds)} folds)"
        raise EvaluateError(f"{store.uri}: no cases in the {split} split{of_fold}")
    return case_ids


def _untrained(card: ModelCard, task: str, uri: str, split: str, case_ids: list[str]) -> list[str]:
    """The split's cases less those the model trained on (the train split: all of them)."""
    if split == "train":
        return case_ids
    unseen = unseen_cases(card, task, case_ids, uri)
    if not unseen:
        raise EvaluateError(f"{uri}: the model trained on every case of the {split} split ({len(case_ids)}), "
                            "so the store's folds were drawn anew since training; evaluate on the store it trained "
                            "on, or with --split test")
    return unseen


def _log(options: EvaluateOptions, metrics: dict[str, float], split: str, tracking_uri: str) -> str | None:
    """Metrics and the report folder (under `evaluation/<split>`) into the run that logged the model."""
    if not options.log_to_mlflow:
        return None
    run = model_run(options.model, tracking_uri)
    if run is None:
        log.warning("%s: no MLflow run found for this model; the report is not logged to MLflow", options.model)
        return None
    run.log_metrics(metrics)
    run.log_folder(options.output, f"evaluation/{split}")
    log.info("logged %d metric(s) and the report to MLflow run %s", len(metrics), run.run_id)
    return run.run_id
