"""MLflow's runs for every stage: where records go (the tracking URI, whether its server answers,
experiments whose artifacts outlive the job) and `TrackedRun`, a run by id that stages log params,
tags, metrics and files into, with its parent/child runs (a search's trials, cross-validation's
folds). Models (logging, registering, loading) are `mlflow_model.py`'s. No other module of the
pipeline imports MLflow but those two and the pyfunc entry (`pyfunc_model.py`).

The default is an embedded SQLite store. MLflow would put that store's artifacts in `./mlruns`
of whatever directory first creates the experiment, which for a Ray job is a temporary copy of
the working directory; experiments created here keep them beside the database instead.

A SQLite store takes concurrent writers (cross-validation folds and Tune trials log from several
processes at once; docs/architecture.md, "Concurrent tracking"): `resolve_tracking_uri` prepares
it once, under a lock beside it (`mlflow.db.lock`), before any writer starts: MLflow creates its
tables there (two processes creating them at once both fail, half-migrated), and the file is
switched to write-ahead logging, where readers never block the one writer and writers queue on
MLflow's 20 s busy timeout instead of failing. `ensure_experiment` takes a concurrent creation of
the same experiment as found.

A tracking server (http:// or https://) is probed before a stage starts any work (before Ray):
GET `<uri>/health`, a few seconds at most, so a server that is down is one line naming its URI
(exit status 2) instead of MLflow's retries. Those retries are bounded too: MLflow's own default
(7 retries with exponential back-off, 120 s per request) takes minutes to give up on a server that
died mid-run; stages set MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT from
`mlflow.http_max_retries` / `mlflow.http_timeout_s`, else keep the environment's, else 2 retries
and 20 s. A local Ray started afterwards inherits them; on a joined cluster set them in the job's
runtime environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from pipeline.common.config import MLflowConfig

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
SERVER_SCHEMES = ("http://", "https://")
MODEL_SCHEMES = ("models:/", "runs:/")  # model URIs that live in the tracking server
PROBE_TIMEOUT_S = 5.0
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 2, "MLFLOW_HTTP_REQUEST_TIMEOUT": 20}
PARENT_TAG = "mlflow.parentRunId"
BATCH = {"params": 100, "metrics": 1000}  # entries per log_batch request: MLflow's limits


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer; the message is one line naming its URI."""


def resolve_tracking_uri(configured: str | None) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/mlflow.db`, made absolute
    so Ray workers and jobs in other directories use the same store; a SQLite store is prepared
    for concurrent writers (`prepare_sqlite_store`)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"{SQLITE_PREFIX}{Path.cwd().resolve() / 'mlflow.db'}"
    elif uri.startswith(SQLITE_PREFIX):
        uri = f"{SQLITE_PREFIX}{Path(uri.removeprefix(SQLITE_PREFIX)).resolve()}"
    elif "://" not in uri and not uri.startswith(("databricks", "file:")):
        return str(Path(uri).resolve())
    if uri.startswith(SQLITE_PREFIX):
        prepare_sqlite_store(uri)
    return uri


def prepare_sqlite_store(uri: str) -> None:
    """Create (or open) the SQLite store at `uri` and switch it to write-ahead logging, holding
    an exclusive lock on `<database>.lock` meanwhile (module docstring). Idempotent."""
    database = Path(uri.removeprefix(SQLITE_PREFIX).split("?")[0])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(f"{database.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)  # MLflow creates or checks its tables
            with contextlib.closing(sqlite3.connect(database, timeout=60)) as connection:
                mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if mode.lower() != "wal":  # a file system without shared memory (network mounts) refuses it
        log.warning("%s: SQLite kept journal mode %s (no write-ahead log); concurrent runs may wait on each other",
                    database, mode)


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, created (with durable artifacts) when it does not exist."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri, name))
    except MlflowException:  # "already exists": created meanwhile by a concurrent job
        created = client.get_experiment_by_name(name)
        if created is None:
            raise
        return created.experiment_id


def _artifact_location(tracking_uri: str, name: str) -> str | None:
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None  # a tracking server or file store chooses its own
    database = Path(tracking_uri.removeprefix(SQLITE_PREFIX))
    return (database.parent / "mlartifacts" / name).resolve().as_uri()


def check_tracking_server(uri: str, settings: MLflowConfig | None = None,
                          timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """For a tracking server (http(s)://): bound MLflow's HTTP retries (`settings`, module
    docstring) and raise TrackingUnavailable unless `<uri>/health` answers within `timeout_s`
    with a status below 500. Other stores (sqlite:, file paths, databricks) are not probed."""
    if not uri.startswith(SERVER_SCHEMES):
        return
    bound_http_retries(settings)
    try:
        response = http_request(get_default_host_creds(uri.rstrip("/")), "/health", "GET", max_retries=0,
                                timeout=timeout_s, raise_on_status=False)
    except MlflowException as err:
        reason = _reason(err, timeout_s)
        raise TrackingUnavailable(f"{uri}: MLflow tracking server does not answer ({reason})") from None
    if response.status_code >= 500:
        raise TrackingUnavailable(f"{uri}: MLflow tracking server answers HTTP {response.status_code} at /health")


def use_tracking_uri(uri: str | None) -> str:
    """Make `uri`, when given, MLflow's tracking URI in this process (where models:/ and runs:/
    URIs are looked up); returns the one in use."""
    if uri:
        mlflow.set_tracking_uri(uri)
    return mlflow.get_tracking_uri()


def check_model_tracking(model_uri: str) -> None:
    """check_tracking_server for MLflow's current tracking URI when `model_uri` lives there
    (models:/, runs:/); a model folder needs no server."""
    if model_uri.startswith(MODEL_SCHEMES):
        check_tracking_server(mlflow.get_tracking_uri())


def bound_http_retries(settings: MLflowConfig | None = None) -> None:
    """MLFLOW_HTTP_REQUEST_MAX_RETRIES and _TIMEOUT for this process and the processes it starts:
    the config's values, else the environment's, else HTTP_RETRY_DEFAULTS."""
    configured = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": settings.http_max_retries if settings else None,
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": settings.http_timeout_s if settings else None}
    for name, value in configured.items():
        if value is not None:
            os.environ[name] = str(value)
        else:
            os.environ.setdefault(name, str(HTTP_RETRY_DEFAULTS[name]))


def _reason(err: BaseException, timeout_s: float) -> str:
    """Why a request failed, in a few words: the socket's error ("Connection refused") or a timeout."""
    chain = list(_causes(err))
    if any(isinstance(e, TimeoutError) for e in chain):
        return f"timed out after {timeout_s:g} s"
    return next((e.strerror for e in chain if isinstance(e, OSError) and e.strerror), str(err).splitlines()[0])


def _causes(err: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def param_value(value: Any) -> str:
    """A value as an MLflow param (tuples as lists, cut to MLflow's 6000 characters)."""
    return str(list(value) if isinstance(value, tuple) else value)[:6000]


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run by id: what the stages log into it, from any process (the driver, a Ray Train
    controller, a Tune trial), with no active run involved."""

    tracking_uri: str
    run_id: str

    @classmethod
    def create(cls, tracking_uri: str, experiment: str, name: str, tags: Mapping[str, str] | None = None,
               params: Mapping[str, Any] | None = None) -> TrackedRun:
        """A new run of `experiment` (created when missing, `ensure_experiment`)."""
        created = MlflowClient(tracking_uri).create_run(ensure_experiment(experiment, tracking_uri),
                                                        run_name=name, tags=dict(tags or {}))
        run = cls(tracking_uri, created.info.run_id)
        run.log_params(params or {})
        return run

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def child(self, tag: str, value: str, name: str, tags: Mapping[str, str] | None = None,
              params: Mapping[str, Any] | None = None) -> tuple[TrackedRun, bool]:
        """(run, created): the child run whose tag `tag` is `value`, reopened (RUNNING) when it
        exists (a resumed job, a retried trial), else created with `tags` and `params`."""
        found = self.children(tag).get(value)
        if found is not None:
            found.reopen()
            return found, False
        created = self.client.create_run(self._experiment_id(), run_name=name,
                                         tags={PARENT_TAG: self.run_id, tag: value, **(tags or {})})
        child = TrackedRun(self.tracking_uri, created.info.run_id)
        child.log_params(params or {})
        return child, True

    def children(self, tag: str) -> dict[str, TrackedRun]:
        """The child runs that carry `tag`, by its value."""
        runs = self.client.search_runs([self._experiment_id()], f"tags.{PARENT_TAG} = '{self.run_id}'")
        return {r.data.tags[tag]: TrackedRun(self.tracking_uri, r.info.run_id) for r in runs if tag in r.data.tags}

    def reopen(self) -> None:
        """Mark the run RUNNING again (a resumed job)."""
        self.client.update_run(self.run_id, status="RUNNING")

    def _experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        entries = [Param(k, param_value(v)) for k, v in params.items()]
        for start in range(0, len(entries), BATCH["params"]):
            self.client.log_batch(self.run_id, params=entries[start : start + BATCH["params"]])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        timestamp = int(time.time() * 1000)
        entries = [Metric(k, float(v), timestamp, step or 0) for k, v in metrics.items()]
        for start in range(0, len(entries), BATCH["metrics"]):
            self.client.log_batch(self.run_id, metrics=entries[start : start + BATCH["metrics"]])

    def latest_metrics(self) -> dict[str, float]:
        """Each metric's last logged value."""
        return dict(self.client.get_run(self.run_id).data.metrics)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of `key`, in step order."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_folder(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), folder)

    def log_dict(self, values: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, values, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, columns: Mapping[str, list[Any]], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=dict(columns), artifact_file=artifact_file)

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status)
