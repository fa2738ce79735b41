"""Log, register and load models in MLflow: weights as safetensors plus a JSON card, no pickle."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from torch import nn

from pipeline.common.model_card import CARD_FILE, ModelCard, load_model_dir, save_model_dir

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_DIR_ARTIFACT = "model_dir"
REQUIREMENTS = ["torch", "monai", "safetensors", "numpy", "mlflow"]


def log_model(
    network: nn.Module,
    card: ModelCard,
    registered_model_name: str | None = None,
    name: str = "model",
) -> ModelInfo:
    """Log the model to the active MLflow run (and register it when a name is given)."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model_dir(network, card, Path(tmp) / MODEL_DIR_ARTIFACT)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_FILE),
            artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
            registered_model_name=registered_model_name,
            pip_requirements=REQUIREMENTS,
            model_config={"folds": list(card.folds) or None},  # a fold ensemble loads a subset with {"folds": [...]}
        )
    log.info("logged model %s%s", info.model_uri, f" as {registered_model_name}" if registered_model_name else "")
    return info


def load_model(
    uri: str, device: str | torch.device = "cpu", folds: tuple[int, ...] | None = None
) -> tuple[nn.Module, ModelCard]:
    """Load from `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/model` or a model folder;
    of a fold ensemble, the members of `folds` (None: all)."""
    local = Path(uri)
    if (local / CARD_FILE).is_file():
        return load_model_dir(local, device, folds)
    if local.is_dir() and (local / "artifacts" / MODEL_DIR_ARTIFACT).is_dir():
        return load_model_dir(local / "artifacts" / MODEL_DIR_ARTIFACT, device, folds)
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except (MlflowException, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"{uri}: model not found ({first_line})") from None
    model_dir = downloaded / "artifacts" / MODEL_DIR_ARTIFACT
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{uri}: not a UniSeg pipeline model (no {MODEL_DIR_ARTIFACT} artifact)")
    return load_model_dir(model_dir, device, folds)
