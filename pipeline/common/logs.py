"""Logging set-up shared by the stage entry points (called once, in `__main__`)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

# Ray Train's module that logs each `ray.train.report` call, whole metrics dict included, at INFO
# from every rank (a screenful per epoch); our own epoch and validation lines say it in one line.
_RAY_REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"


def setup_logging(level: str | int | None = None) -> None:
    """Log to stderr with timestamps; level from the argument or UNISEG_LOG_LEVEL (INFO)."""
    logging.basicConfig(
        level=level or os.environ.get("UNISEG_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def quiet_ray_train_reports() -> None:
    """Keep Ray Train's per-report INFO lines out of the job log (warnings still show)."""
    with contextlib.suppress(ModuleNotFoundError):  # another Ray version: its logging stays as it is
        spec = importlib.util.find_spec(_RAY_REPORT_LOGGER_MODULE)
        if spec is not None and spec.origin:
            logging.getLogger(spec.origin).setLevel(logging.WARNING)  # Ray names this logger by file path
