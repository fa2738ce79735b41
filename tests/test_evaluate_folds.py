"""`pipeline.evaluate --split val` scores the cases the model held out in training: those of the
fold in its card (`data.fold` at training time), or of the one fold picked of a fold ensemble;
an ensemble of several folds has no validation split (exit status 2, one line). Whatever folds a
store has drawn since training, no case the model trained on is scored (the card records them)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.common.config import IngestConfig, config_from_dict
from pipeline.common.inference import InferenceOptions
from pipeline.common.model_card import CARD_FILE, WEIGHTS_FILE, ModelCard, write_ensemble_dir
from pipeline.common.store import TaskStore
from pipeline.evaluate.__main__ import main
from pipeline.evaluate.run import EvaluateOptions, run
from pipeline.ingest.run import run as ingest
from pipeline.train.build import model_card
from pipeline.train.folds import _score_cases
from test_predict_world import LIVER, SPLEEN, TARGET_SPACING, World, single_thread, world  # noqa: F401 (fixtures)

FAST = InferenceOptions(mirror_axes=())


def _held_out(world: World, fold: int) -> set[tuple[str, str]]:
    """(task, case) of fold `fold`'s held-out cases of both stores, as the stores record them."""
    return {(task.name, case) for task in (LIVER, SPLEEN)
            for case in TaskStore.open(world.stores[task.name]).manifest.folds[fold]}


def _with_fold(world: World, fold: int, directory: Path) -> Path:
    """The world's model as trained with `data.fold: fold`: its card written by training's code."""
    shutil.copytree(world.model_dir, directory)
    cfg = config_from_dict({"name": "fold-run", "data": {"stores": list(world.stores.values()), "fold": fold}})
    manifests = [TaskStore.open(s, fold=fold).manifest for s in world.stores.values()]  # as training opens them
    trained = model_card(cfg, world.card.spec, manifests, epoch=3)
    assert trained.metadata["fold"] == fold and trained.held_out_folds == (fold,)
    # the world's task table (it has an extra task)
    card = replace(world.card, metadata=trained.metadata, trained_cases=trained.trained_cases)
    (directory / CARD_FILE).write_text(card.to_json())
    return directory


def _scored(world: World, model: Path, output: Path, **changes: object) -> set[tuple[str, str]]:
    options = EvaluateOptions(model=str(model), stores=(world.stores[LIVER.name], world.stores[SPLEEN.name]),
                              output=output, space="store", inference=FAST, log_to_mlflow=False)
    return {(r.task, r.case) for r in run(replace(options, **changes)).rows}


def test_val_split_is_the_fold_the_model_held_out(world: World, tmp_path: Path) -> None:
    assert _held_out(world, 1) != _held_out(world, 0)
    model = _with_fold(world, 1, tmp_path / "fold1")
    assert _scored(world, model, tmp_path / "val") == _held_out(world, 1)
    trained_on = _scored(world, model, tmp_path / "train", split="train")
    assert not trained_on & _held_out(world, 1) and _held_out(world, 0) <= trained_on
    assert _scored(world, world.model_dir, tmp_path / "default") == _held_out(world, 0)  # no fold: fold 0


@pytest.mark.catalogue("evaluate-fold-split")
def test_fold_ensemble_val_split_needs_one_fold(world: World, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    folds = {k: _with_fold(world, k, tmp_path / f"fold{k}") for k in (1, 2)}
    ensemble = write_ensemble_dir(folds, tmp_path / "ensemble")
    card = ModelCard.from_json((ensemble / CARD_FILE).read_text())
    assert "fold" not in card.metadata and card.held_out_folds == (1, 2)
    store = TaskStore.open(world.stores[LIVER.name])
    liver = set(store.case_ids("train") + store.case_ids("validation")) - {c for _, c in _held_out(world, 2)}
    assert card.select_folds((2,)).cases_trained_on(LIVER.name) == liver  # each member's own training cases
    assert card.cases_trained_on(LIVER.name) > liver
    assert _scored(world, ensemble, tmp_path / "val", folds=(2,)) == _held_out(world, 2)
    caplog.set_level(logging.INFO)
    assert main(["--model", str(ensemble), "--store", world.stores[LIVER.name], "--split", "val", "--no-mlflow",
                 "-o", str(tmp_path / "all")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["--split val: every fold of this ensemble (folds 1, 2) saw the others' validation cases in "
                      "training; use --split test, or --folds k to score fold k's held-out cases with that fold's "
                      "weights"]
    assert not (tmp_path / "all").exists()


def _without_case(raw: Path, case_id: str, root: Path) -> Path:
    """A copy of the MSD folder `raw` without training case `case_id` (dataset.json and files)."""
    copy = shutil.copytree(raw, root / raw.name)
    meta = json.loads((copy / "dataset.json").read_text())
    meta["training"] = [e for e in meta["training"] if case_id not in e["image"]]
    meta["numTraining"] = len(meta["training"])
    (copy / "dataset.json").write_text(json.dumps(meta))
    for path in copy.glob(f"*Tr/{case_id}*"):
        path.unlink()
    return copy


@pytest.mark.catalogue("evaluate-trained-cases")
def test_re_ingested_store_with_moved_folds_scores_no_training_case(world: World, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The liver dataset ingested anew with case 000 removed (as on another machine): its fold 0
    moves from 002, 004 to 003, 004; fold 2 from 000 to 002."""
    raw = _without_case(world.raw[LIVER.name], "synthliver_000", tmp_path / "raw")
    config = IngestConfig(target_spacing=TARGET_SPACING, ct_normalization="uniseg-window", folds=3, split_seed=8,
                          scheduler="synchronous")  # as the world's stores
    report = ingest([str(raw)], str(tmp_path / "stores"), config)
    assert report.ok
    store = report.datasets[0].store
    models = {k: _with_fold(world, k, tmp_path / f"fold{k}") for k in (0, 2)}
    trained = ModelCard.from_json((models[0] / CARD_FILE).read_text()).cases_trained_on(LIVER.name)
    old_val = set(TaskStore.open(world.stores[LIVER.name], fold=0).case_ids("validation"))
    new_val = set(TaskStore.open(store, fold=0).case_ids("validation"))
    assert trained == {"synthliver_000", "synthliver_001", "synthliver_003"} and not trained & old_val
    assert trained & new_val == {"synthliver_003"}  # the folds moved: a training case now validates

    caplog.set_level(logging.WARNING)
    scored = _scored(world, models[0], tmp_path / "val", stores=(store,))
    assert scored == {(LIVER.name, "synthliver_004")}
    assert [r.getMessage() for r in caplog.records] == [
        f"{store}: 1 case(s) the model trained on, not scored (the store's folds were drawn anew since "
        "training): synthliver_003"]
    assert "1 case(s) the model trained on left out" in (tmp_path / "val" / "summary.md").read_text()
    # cross-validation's out-of-fold scoring (the Ray task's body) on that store leaves it out too
    out_of_fold = _score_cases((models[0] / WEIGHTS_FILE).read_bytes(), (models[0] / CARD_FILE).read_text(),
                               [store], 0, amp=False)
    assert {r.case for r in out_of_fold} == {"synthliver_004"}

    caplog.clear()
    assert main(["--model", str(models[2]), "--store", store, "--split", "val", "--no-mlflow", "--space", "store",
                 "-o", str(tmp_path / "nothing-left")]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"{store}: the model trained on every case of the validation split (1), so the store's folds were drawn "
        "anew since training; evaluate on the store it trained on, or with --split test"]
    assert not (tmp_path / "nothing-left").exists()


def test_card_without_trained_cases_trusts_the_store(world: World, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    assert world.card.trained_cases is None  # as every card written before the field
    caplog.set_level(logging.WARNING)
    assert _scored(world, world.model_dir, tmp_path / "val") == _held_out(world, 0)
    assert any("does not record the cases the model trained on" in r.getMessage() for r in caplog.records)
