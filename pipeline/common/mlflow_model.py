"""Log, register and load models in MLflow: weights as safetensors plus a JSON card, no pickle.

A logged model runs anywhere MLflow can build its environment (`mlflow models serve`, a
deployment target): it carries its code (the `model` and `pipeline` packages as MLflow
`code_paths`, copied from wherever they are imported, checkout or installed wheel) and pins
what that code imports when it loads and predicts (PYFUNC_DISTRIBUTIONS, at the versions this
process runs), with a signature and an input example (`pyfunc_io.py`).

Code paths, not the project's wheel: a wheel would have to be built at log time (from a checkout
with pyproject.toml; a cluster job may run from an installed package) and shipped beside the
model as a file requirement; the packages' source is 0.7 MB, is exactly what trained the model,
and loads with no build step. Only the modules the pyfunc imports need their dependencies.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from packaging.version import Version
from torch import nn

import model as model_package
import pipeline as pipeline_package
from pipeline.common.model_card import CARD_FILE, ModelCard, load_model_dir, save_model_dir
from pipeline.common.pyfunc_io import SIGNATURE, example_input

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_DIR_ARTIFACT = "model_dir"
CODE_PACKAGES = (model_package, pipeline_package)
# Distributions whose modules pyfunc_model.py and what it imports (pipeline.common.{inference,
# geometry, intensity, model_card, ensemble, nifti, pyfunc_io}, model.*) use at load and predict
# time. tests/test_serve.py builds a venv from these alone and serves a model from it.
PYFUNC_DISTRIBUTIONS = ("mlflow", "torch", "numpy", "pandas", "nibabel", "scipy", "monai", "safetensors")


def pyfunc_requirements() -> list[str]:
    """PYFUNC_DISTRIBUTIONS pinned to the versions installed here. A local version label is
    dropped (torch 2.13.0+cpu -> torch==2.13.0): the serving machine picks its own build of the
    release (CPU or CUDA), as the Makefile and the cluster YAMLs do."""
    return [f"{name}=={Version(importlib.metadata.version(name)).public}" for name in PYFUNC_DISTRIBUTIONS]


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
            code_paths=_copy_code(Path(tmp) / "code"),
            registered_model_name=registered_model_name,
            pip_requirements=pyfunc_requirements(),
            signature=SIGNATURE,
            input_example=example_input(card),  # MLflow predicts it once while logging: one window
            model_config={"folds": list(card.folds) or None},  # a fold ensemble loads a subset with {"folds": [...]}
        )
    log.info("logged model %s%s", info.model_uri, f" as {registered_model_name}" if registered_model_name else "")
    return info


def _copy_code(target: Path) -> list[str]:
    """The CODE_PACKAGES' source (no caches) under `target`, one folder per package."""
    folders = []
    for package in CODE_PACKAGES:
        source = Path(package.__file__).parent
        folders.append(str(shutil.copytree(source, target / source.name,
                                           ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))))
    return folders


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
