"""What every stage shares at its edges: exit status (0 done, 2 bad input as one line, 1 failure with
a traceback) and a job log without Ray Train's per-report dumps."""

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


def test_ray_train_report_lines_are_quieted() -> None:
    from ray.train.v2._internal.execution import context

    from pipeline.common.logs import quiet_ray_train_reports

    quiet_ray_train_reports()
    assert not context.logger.isEnabledFor(logging.INFO) and context.logger.isEnabledFor(logging.WARNING)


STAGES = ["ingest", "train", "evaluate", "tune", "finetune", "predict", "datasets"]


@pytest.mark.parametrize("stage", STAGES)
def test_help_documents_every_option(stage: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import argparse
    import importlib

    parsers: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.print_help
    monkeypatch.setattr(argparse.ArgumentParser, "print_help",
                        lambda self, file=None: (parsers.append(self), real(self, file))[1])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"pipeline.{stage}.__main__").main(["--help"])
    assert exit_info.value.code == 0
    (parser,) = parsers
    undocumented = [a.dest for a in parser._actions if not a.help and a.dest != "help"]
    assert undocumented == [], f"pipeline.{stage} --help: no help text for {undocumented}"
    text = capsys.readouterr().out
    assert f"python -m pipeline.{stage}" in text and "xit status" in text or stage == "datasets"
    if stage in ("train", "tune", "finetune"):
        assert "train.learning_rate: PositiveFloat = 0.01" in text and "ray.num_workers" in text
