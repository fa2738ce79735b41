"""Log, register, find and load models in MLflow: weights as safetensors plus a JSON card, no pickle.

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

import re

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema
from packaging.version import Version
from torch import nn

import model as model_package
import pipeline as pipeline_package
from pipeline.common.inference import InferenceOptions
from pipeline.common.model_card import CARD_FILE, ModelCard, load_model_dir, save_model_dir
from pipeline.common.pyfunc_io import example_input
from pipeline.common.tracking import TrackedRun, use_tracking_uri

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_DIR_ARTIFACT = "model_dir"
CODE_PACKAGES = (model_package, pipeline_package)
# Distributions whose modules pyfunc_model.py and what it imports (pipeline.common.{inference,
# geometry, intensity, model_card, ensemble, nifti, pyfunc_io}, model.*) use at load and predict
# time. tests/test_serve.py builds a venv from these alone and serves a model from it.
PYFUNC_DISTRIBUTIONS = ("mlflow", "torch", "numpy", "pandas", "nibabel", "scipy", "monai", "safetensors")
# The columns and params pyfunc_io.py describes.
SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec(DataType.string, "task"),
        ColSpec(DataType.binary, "image", required=False),
        ColSpec(DataType.string, "path", required=False),
        ColSpec(AnyType(), "array", required=False),
    ]),
    outputs=Schema([
        ColSpec(DataType.string, "task"),
        ColSpec(AnyType(), "labels"),
        ColSpec(Array(Array(DataType.double)), "affine", required=False),
        ColSpec(DataType.string, "classes"),
    ]),
    params=ParamSchema([
        ParamSpec("tta", DataType.boolean, False),
        ParamSpec("overlap", DataType.double, InferenceOptions().overlap),
    ]),
)
_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_RUN = re.compile(r"^runs:/(?P<run>[^/]+)(/.*)?$")


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


def log_model_to_run(run: TrackedRun, network: nn.Module, card: ModelCard, registered_name: str | None = None,
                     alias: str | None = None) -> str:
    """Log the model to `run` (and register it, under `alias` when given); returns its URI:
    models:/NAME@ALIAS, models:/NAME/VERSION, or the run's model URI when not registered."""
    mlflow.set_tracking_uri(run.tracking_uri)
    with mlflow.start_run(run_id=run.run_id):
        info = log_model(network, card, registered_model_name=registered_name)
    version = getattr(info, "registered_model_version", None)
    if not (registered_name and version):
        return info.model_uri
    if alias:
        MlflowClient(run.tracking_uri).set_registered_model_alias(registered_name, alias, version)
        return f"models:/{registered_name}@{alias}"
    return f"models:/{registered_name}/{version}"


def pin_model_uri(uri: str, tracking_uri: str) -> str:
    """`models:/NAME@ALIAS` -> `models:/NAME/VERSION` (the version the alias names now); other URIs as given."""
    match = _ALIAS.match(uri)
    if not match:
        return uri
    try:
        version = MlflowClient(tracking_uri).get_model_version_by_alias(match["name"], match["alias"]).version
    except MlflowException as err:  # unknown name or alias
        raise FileNotFoundError(f"{uri}: no such registered model alias ({str(err).splitlines()[0]})") from None
    return f"models:/{match['name']}/{version}"


def model_run(uri: str, tracking_uri: str) -> TrackedRun | None:
    """The run that logged the model at `uri`; None for a model folder or an unknown model."""
    client = MlflowClient(tracking_uri)
    try:
        if match := _ALIAS.match(uri):
            run_id = client.get_model_version_by_alias(match["name"], match["alias"]).run_id
        elif match := _VERSION.match(uri):
            run_id = client.get_model_version(match["name"], match["version"]).run_id
        else:
            match = _RUN.match(uri)
            run_id = match["run"] if match else None
    except MlflowException as err:
        log.warning("%s: cannot find the model's run (%s)", uri, str(err).splitlines()[0])
        return None
    return TrackedRun(tracking_uri, run_id) if run_id else None


def _copy_code(target: Path) -> list[str]:
    """The CODE_PACKAGES' source (no caches) under `target`, one folder per package."""
    folders = []
    for package in CODE_PACKAGES:
        source = Path(package.__file__).parent
        folders.append(str(shutil.copytree(source, target / source.name,
                                           ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))))
    return folders


def load_model(
    uri: str, device: str | torch.device = "cpu", folds: tuple[int, ...] | None = None,
    tracking_uri: str | None = None,
) -> tuple[nn.Module, ModelCard]:
    """Load from `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/model` (from `tracking_uri`,
    default MLflow's current one) or a model folder; of a fold ensemble, the members of `folds` (None: all)."""
    local = Path(uri)
    if (local / CARD_FILE).is_file():
        return load_model_dir(local, device, folds)
    if local.is_dir() and (local / "artifacts" / MODEL_DIR_ARTIFACT).is_dir():
        return load_model_dir(local / "artifacts" / MODEL_DIR_ARTIFACT, device, folds)
    try:
        use_tracking_uri(tracking_uri)  # MLflow resolves models:/ URIs partly through its current URI
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except (MlflowException, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"{uri}: model not found ({first_line})") from None
    model_dir = downloaded / "artifacts" / MODEL_DIR_ARTIFACT
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{uri}: not a UniSeg pipeline model (no {MODEL_DIR_ARTIFACT} artifact)")
    return load_model_dir(model_dir, device, folds)
