"""Fold ensembles: one card, a weights file per fold, the folds' softmax averaged (with and
without TTA), subsets by fold, logged to and loaded from MLflow without pickle."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from model.presets import PRESETS
from pipeline.common.ensemble import FoldEnsemble
from pipeline.common.inference import InferenceOptions, predict_probabilities
from pipeline.common.mlflow_model import load_model, log_model
from pipeline.common.model_card import (
    CARD_FILE, ModelCard, TaskCard, build_from_card, load_model_dir, save_model_dir, write_ensemble_dir,
)

CT = TaskCard("liver", {0: "background", 1: "liver", 2: "tumour"}, ("CT",), (2.0, 1.0, 1.0),
              ({"scheme": "ct-window", "lower": -325.0, "upper": 325.0},))
SPLEEN = TaskCard("spleen", {0: "background", 1: "spleen"}, ("CT",), (2.0, 1.0, 1.0),
                  ({"scheme": "ct-window", "lower": -325.0, "upper": 325.0},))
CARD = ModelCard(PRESETS["tiny"].replace(patch_size=(16, 32, 32)), (CT, SPLEEN), metadata={"run": "test"})
PATCH = (16, 32, 32)


@pytest.fixture(scope="module")
def fold_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Three single-network model folders with different weights (folds 0, 1, 2)."""
    root = tmp_path_factory.mktemp("folds")
    dirs = {}
    for fold in range(3):
        torch.manual_seed(fold)
        network = build_from_card(CARD)
        for parameter in network.parameters():  # sizeable weights: members that disagree
            parameter.data.normal_(0, 0.3)
        dirs[fold] = save_model_dir(network, CARD, root / f"fold{fold}")
    return dirs


def _probabilities(network: torch.nn.Module, image: torch.Tensor, task: int, tta: bool) -> torch.Tensor:
    options = InferenceOptions(mirror_axes=(2,) if tta else (), amp=False)  # one axis: the same code path, 2 passes
    return predict_probabilities(network, image, task, CARD.tasks[task].num_classes, PATCH, options)


@pytest.mark.parametrize("tta", [False, True])
def test_ensemble_averages_the_folds_softmax(fold_dirs: dict[int, Path], tmp_path: Path, tta: bool) -> None:
    write_ensemble_dir(fold_dirs, tmp_path / "ensemble", {"cv": "test"})
    ensemble, card = load_model_dir(tmp_path / "ensemble")
    assert isinstance(ensemble, FoldEnsemble) and card.folds == (0, 1, 2) and card.metadata["cv"] == "test"
    image = torch.randn(1, 20, 40, 36)  # not a multiple of the patch: several windows, overlaps
    singles = [_probabilities(load_model_dir(d)[0], image, 0, tta) for d in fold_dirs.values()]
    expected = torch.stack(singles).mean(0)
    got = _probabilities(ensemble, image, 0, tta)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(singles[0], singles[1], atol=1e-2)  # the members do disagree
    assert torch.allclose(got.sum(0), torch.ones_like(got[0]), atol=1e-5)  # a task's classes only
    # A subset of the folds averages just those.
    pair, pair_card = load_model_dir(tmp_path / "ensemble", folds=(0, 2))
    assert pair_card.folds == (0, 2)
    assert torch.allclose(_probabilities(pair, image, 0, tta), (singles[0] + singles[2]) / 2, atol=1e-5)


def test_ensemble_folder_is_one_card_and_a_file_per_fold(fold_dirs: dict[int, Path], tmp_path: Path) -> None:
    folder = write_ensemble_dir(fold_dirs, tmp_path / "ensemble")
    assert sorted(p.name for p in folder.iterdir()) == [CARD_FILE, "fold_0.safetensors", "fold_1.safetensors",
                                                         "fold_2.safetensors"]
    raw = json.loads((folder / CARD_FILE).read_text())
    assert raw["members"] == [{"file": f"fold_{k}.safetensors", "fold": k} for k in range(3)]
    ensemble, card = load_model_dir(folder)
    again = save_model_dir(ensemble, card, tmp_path / "again")  # round trip through save
    assert ModelCard.from_json((again / CARD_FILE).read_text()) == card
    with pytest.raises(ValueError, match="this ensemble has folds 0, 1, 2"):
        load_model_dir(folder, folds=(3,))
    with pytest.raises(ValueError, match="single network, not a fold ensemble"):
        load_model_dir(fold_dirs[0], folds=(0,))
    (folder / "fold_1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="fold_1.safetensors missing"):
        load_model_dir(folder)
    assert load_model_dir(folder, folds=(0, 2))[1].folds == (0, 2)


def test_ensemble_through_mlflow_pyfunc(fold_dirs: dict[int, Path], tmp_path: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ensemble, card = load_model_dir(write_ensemble_dir(fold_dirs, tmp_path / "ensemble"))
    with mlflow.start_run():
        info = log_model(ensemble, card, registered_model_name="folds")
    network, loaded = load_model("models:/folds/1", folds=(1,))
    assert loaded.folds == (1,) and len(network.members) == 1
    image = torch.randn(1, 16, 32, 32)
    single = _probabilities(load_model_dir(fold_dirs[1])[0], image, 1, False)
    assert torch.allclose(_probabilities(network, image, 1, False), single, atol=1e-5)
    pyfunc = mlflow.pyfunc.load_model(info.model_uri, model_config={"folds": [0, 2]})
    (labels,) = pyfunc.predict([{"task": "spleen", "array": image.numpy()}])["labels"]
    pair = load_model_dir(tmp_path / "ensemble", folds=(0, 2))[0]
    assert (labels == _probabilities(pair, image, 1, False).argmax(0).numpy()).all()
