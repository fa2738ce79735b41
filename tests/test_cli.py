"""Every stage's exit status: 0 done, 2 bad input as one line, 1 failure with a traceback."""

from __future__ import annotations

import logging

import pytest

from pipeline.common.cli import run_stage

log = logging.getLogger("pipeline.test")


def _raise(error: Exception) -> None:
    raise error


def test_done_is_0() -> None:
    assert run_stage(lambda: "report", log, "testing", (ValueError,)) == 0


def test_bad_input_is_one_line_and_2(caplog: pytest.LogCaptureFixture) -> None:
    assert run_stage(lambda: _raise(ValueError("cfg.yaml: train.epochs: not an int")), log, "testing", (ValueError,)) == 2
    (record,) = caplog.records
    assert record.getMessage() == "cfg.yaml: train.epochs: not an int" and record.exc_info is None


def test_failure_is_logged_with_traceback_and_1(caplog: pytest.LogCaptureFixture) -> None:
    assert run_stage(lambda: _raise(RuntimeError("worker died")), log, "testing", (ValueError,)) == 1
    (record,) = caplog.records
    assert record.getMessage() == "testing failed" and record.exc_info[1].args == ("worker died",)
