"""Log an evaluation to the MLflow run that produced the model."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_RUN = re.compile(r"^runs:/(?P<run>[^/]+)(/.*)?$")


def model_run_id(uri: str, client: MlflowClient) -> str | None:
    """The run that logged the model at `uri`; None for a model folder or an unknown form."""
    try:
        if match := _ALIAS.match(uri):
            return client.get_model_version_by_alias(match["name"], match["alias"]).run_id
        if match := _VERSION.match(uri):
            return client.get_model_version(match["name"], match["version"]).run_id
    except MlflowException as err:
        log.warning("%s: cannot find the model's run (%s)", uri, str(err).splitlines()[0])
        return None
    match = _RUN.match(uri)
    return match["run"] if match else None


def log_evaluation(client: MlflowClient, run_id: str, metrics: Mapping[str, float], folder: Path, split: str) -> None:
    """Metrics into the run, the report folder as artifacts under `evaluation/<split>`."""
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_artifacts(run_id, str(folder), artifact_path=f"evaluation/{split}")
    log.info("logged %d metric(s) and the report to MLflow run %s", len(metrics), run_id)
