"""Where MLflow records go: the tracking URI, whether its server answers, and experiments whose
artifacts outlive the job.

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
from collections.abc import Iterator
from pathlib import Path

import mlflow
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
