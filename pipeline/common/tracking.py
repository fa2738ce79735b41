"""Where MLflow records go: the tracking URI and experiments whose artifacts outlive the job.

The default is an embedded SQLite store. MLflow would put that store's artifacts in `./mlruns`
of whatever directory first creates the experiment, which for a Ray job is a temporary copy of
the working directory; experiments created here keep them beside the database instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.tracking import MlflowClient

SQLITE_PREFIX = "sqlite:///"


def resolve_tracking_uri(configured: str | None) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/mlflow.db`, made absolute
    so Ray workers and jobs in other directories use the same store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"{SQLITE_PREFIX}{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith(SQLITE_PREFIX):
        return f"{SQLITE_PREFIX}{Path(uri.removeprefix(SQLITE_PREFIX)).resolve()}"
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return str(Path(uri).resolve())
    return uri


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, created (with durable artifacts) when it does not exist."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri, name))


def _artifact_location(tracking_uri: str, name: str) -> str | None:
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None  # a tracking server or file store chooses its own
    database = Path(tracking_uri.removeprefix(SQLITE_PREFIX))
    return (database.parent / "mlartifacts" / name).resolve().as_uri()

