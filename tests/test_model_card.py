import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from model.presets import PRESETS
from pipeline.common.mlflow_model import load_model, log_model
from pipeline.common.model_card import WEIGHTS_FILE, ModelCard, TaskCard, build_from_card, load_model_dir, save_model_dir

CT = TaskCard("liver", {0: "background", 1: "liver", 2: "tumour"}, ("CT",), (2.0, 1.0, 1.0),
              ({"scheme": "ct-window", "lower": -325.0, "upper": 325.0},))
MR = TaskCard("brain", {0: "background", 1: "edema", 2: "core", 3: "enhancing"}, ("T1", "T1c", "T2", "FLAIR"),
              (1.0, 1.0, 1.0), ({"scheme": "zscore"},) * 4, image_order=1)
CARD = ModelCard(PRESETS["tiny"].replace(patch_size=(16, 32, 32)), (CT, MR), metadata={"run": "test"})


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_model_folder_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = build_from_card(CARD)
    save_model_dir(network, CARD, tmp_path)
    loaded, card = load_model_dir(tmp_path)
    assert card == CARD and card.tasks[1].in_channels == 4 and card.tasks[0].num_classes == 3
    assert card.tasks[1].image_order == 1
    assert _same_weights(network, loaded)


def test_card_without_image_order_reads_ingest_default() -> None:
    raw = json.loads(CARD.to_json())
    del raw["tasks"][1]["image_order"]
    assert ModelCard.from_json(json.dumps(raw)).tasks[1].image_order == 3


def test_model_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model_dir(tmp_path)
    save_model_dir(build_from_card(CARD), CARD, tmp_path)
    raw = json.loads((tmp_path / "card.json").read_text())
    (tmp_path / "card.json").write_text(json.dumps({**raw, "version": 99}))
    with pytest.raises(ValueError, match="model card version 99 is not supported"):
        load_model_dir(tmp_path)


def test_weights_are_safetensors_not_pickle(tmp_path: Path) -> None:
    save_model_dir(build_from_card(CARD), CARD, tmp_path)
    header_size = int.from_bytes((tmp_path / WEIGHTS_FILE).read_bytes()[:8], "little")
    header = json.loads((tmp_path / WEIGHTS_FILE).read_bytes()[8 : 8 + header_size])
    assert "prompt" in header


def test_unknown_task_name() -> None:
    with pytest.raises(ValueError, match="unknown task 'lung'; this model knows liver, brain"):
        CARD.task_index("lung")


def test_register_and_load_from_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    torch.manual_seed(1)
    network = build_from_card(CARD)
    with mlflow.start_run():
        log_model(network, CARD, registered_model_name="tiny-test")
    MlflowClient().set_registered_model_alias("tiny-test", "champion", 1)
    loaded, card = load_model("models:/tiny-test@champion")
    assert card == CARD and _same_weights(network, loaded)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-test/1")
    (labels,) = pyfunc.predict([{"array": np.random.rand(4, 20, 36, 40).astype(np.float32), "task": "brain"}])["labels"]
    assert labels.shape == (20, 36, 40) and labels.dtype == np.uint8 and labels.max() <= 3
    with pytest.raises(FileNotFoundError, match="models:/absent@champion: model not found"):
        load_model("models:/absent@champion")
