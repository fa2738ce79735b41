"""`pipeline.evaluate --split val` scores the cases the model held out in training: those of the
fold in its card (`data.fold` at training time), or of the one fold picked of a fold ensemble;
an ensemble of several folds has no validation split (exit status 2, one line)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.common.config import config_from_dict
from pipeline.common.inference import InferenceOptions
from pipeline.common.model_card import CARD_FILE, ModelCard, write_ensemble_dir
from pipeline.common.store import TaskStore
from pipeline.evaluate.__main__ import main
from pipeline.evaluate.run import EvaluateOptions, run
from pipeline.train.build import model_card
from test_predict_world import LIVER, SPLEEN, World, single_thread, world  # noqa: F401 (fixtures)

FAST = InferenceOptions(mirror_axes=())


def _held_out(world: World, fold: int) -> set[tuple[str, str]]:
    """(task, case) of fold `fold`'s held-out cases of both stores, as the stores record them."""
    return {(task.name, case) for task in (LIVER, SPLEEN)
            for case in TaskStore.open(world.stores[task.name]).manifest.folds[fold]}


def _with_fold(world: World, fold: int, directory: Path) -> Path:
    """The world's model as trained with `data.fold: fold`: its card written by training's code."""
    shutil.copytree(world.model_dir, directory)
    cfg = config_from_dict({"name": "fold-run", "data": {"stores": list(world.stores.values()), "fold": fold}})
    manifests = [TaskStore.open(s).manifest for s in world.stores.values()]
    trained = model_card(cfg, world.card.spec, manifests, epoch=3)
    assert trained.metadata["fold"] == fold and trained.held_out_folds == (fold,)
    card = replace(world.card, metadata=trained.metadata)  # the world's task table (it has an extra task)
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
    assert _scored(world, ensemble, tmp_path / "val", folds=(2,)) == _held_out(world, 2)
    caplog.set_level(logging.INFO)
    assert main(["--model", str(ensemble), "--store", world.stores[LIVER.name], "--split", "val", "--no-mlflow",
                 "-o", str(tmp_path / "all")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["--split val: every fold of this ensemble (folds 1, 2) saw the others' validation cases in "
                      "training; use --split test, or --folds k to score fold k's held-out cases with that fold's "
                      "weights"]
    assert not (tmp_path / "all").exists()
