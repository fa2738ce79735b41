"""The tracking server check: a stage whose MLflow server does not answer stops before any work
(before Ray starts, before a model is loaded) with one line naming the URI, exit status 2; MLflow's
own HTTP retries are bounded. Loopback only: a closed port, a socket that never answers, a tiny
HTTP server."""

from __future__ import annotations

import importlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.common.config import MLflowConfig
from pipeline.common.tracking import HTTP_RETRY_DEFAULTS, TrackingUnavailable, bound_http_retries, check_tracking_server

SECONDS = 15  # the most a stage may take to refuse an unreachable server


@pytest.fixture(autouse=True)
def _restored_mlflow_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's tracking URI and the variables the stages set, as they were, after each test."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)
    for name in ("MLFLOW_TRACKING_URI", *HTTP_RETRY_DEFAULTS):
        original = os.environ.get(name)
        monkeypatch.setenv(name, original or "")  # records the original for teardown
        if original is None:
            monkeypatch.delenv(name)


@pytest.fixture()
def closed_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture()
def server() -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on loopback answering every GET with its `status` attribute."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(self.server.status)  # type: ignore[attr-defined]
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.status = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_closed_port_is_one_line_at_once(closed_uri: str) -> None:
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as err:
        check_tracking_server(closed_uri)
    assert str(err.value) == f"{closed_uri}: MLflow tracking server does not answer (Connection refused)"
    assert time.monotonic() - started < SECONDS


def test_silent_server_times_out() -> None:
    with socket.socket() as sock:  # accepts connections (the backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(TrackingUnavailable, match=r"does not answer \(timed out after 0.5 s\)$"):
            check_tracking_server(uri, timeout_s=0.5)


def test_answering_server_passes_and_a_server_error_does_not(server: ThreadingHTTPServer) -> None:
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    check_tracking_server(uri)
    server.status = 404  # type: ignore[attr-defined]  # it answers (a proxy without /health)
    check_tracking_server(uri + "/")
    server.status = 502  # type: ignore[attr-defined]
    with pytest.raises(TrackingUnavailable, match=f"^{uri}: MLflow tracking server answers HTTP 502 at /health$"):
        check_tracking_server(uri)


def _unset_retry_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset for this test (an earlier in-process stage may have set them) and put back after it,
    whatever the test sets: setenv records the value to restore, delenv alone would not when unset."""
    for name in HTTP_RETRY_DEFAULTS:
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)


def test_local_stores_are_not_probed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _unset_retry_bounds(monkeypatch)
    for uri in (f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "mlruns"), f"file://{tmp_path}/mlruns"):
        check_tracking_server(uri)
    assert not {"MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"} & set(os.environ)


def test_http_retries_bounded_from_config_else_environment_else_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    _unset_retry_bounds(monkeypatch)
    bound_http_retries()
    assert (os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) == ("2", "20")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    bound_http_retries(MLflowConfig())
    assert (os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) == ("2", "60")
    bound_http_retries(MLflowConfig(http_max_retries=0, http_timeout_s=5))
    assert (os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) == ("0", "5")


def _must_not_run(what: str) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{what} before the tracking server was checked")
    return fail


def _stage_argv(stage: str, uri: str, tmp_path: Path) -> list[str]:
    config = tmp_path / "exp.yaml"
    config.write_text("{}\n")
    common = ["--config", str(config), "--set", f"mlflow.tracking_uri={uri}",
              "--set", f"ray.storage_path={tmp_path}/ray"]
    return {
        "train": common,
        "train --folds": [*common, "--folds", "all"],
        "tune": [*common, "--set", "tune.space={train.learning_rate: {type: choice, values: [0.1]}}"],
        "finetune": [*common, "--pretrained", "models:/x@y", "--store", str(tmp_path)],
        "evaluate": ["--model", "models:/x@y", "--store", str(tmp_path), "--tracking-uri", uri],
        "predict": ["--model", "models:/x@y", "--task", "t", "-i", str(tmp_path), "-o", str(tmp_path / "out"),
                    "--tracking-uri", uri],
    }[stage]


NOT_BEFORE_THE_CHECK = {  # what each stage must not reach with a server that does not answer
    "train": ["pipeline.train.run.connect_ray"],
    "train --folds": ["pipeline.train.folds.connect_ray", "pipeline.train.folds.check_stores"],
    "tune": ["pipeline.tune.run.connect_ray"],
    "finetune": ["pipeline.train.finetune.load_model", "pipeline.train.run.connect_ray"],
    "evaluate": ["pipeline.evaluate.run.load_model"],
    "predict": ["pipeline.predict.run.load_model"],
}


@pytest.mark.catalogue("tracking-down")
@pytest.mark.parametrize("stage", list(NOT_BEFORE_THE_CHECK))
def test_stage_refuses_an_unreachable_server_before_any_work(stage: str, closed_uri: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    for target in NOT_BEFORE_THE_CHECK[stage]:
        monkeypatch.setattr(target, _must_not_run(target))
    main = importlib.import_module(f"pipeline.{stage.split()[0]}.__main__").main
    started = time.monotonic()
    status = main(_stage_argv(stage, closed_uri, tmp_path))
    assert time.monotonic() - started < SECONDS
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert status == 2 and len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    assert errors[0].getMessage() == f"{closed_uri}: MLflow tracking server does not answer (Connection refused)"
