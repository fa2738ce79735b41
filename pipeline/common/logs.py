"""Logging set-up shared by the stage entry points (called once, in `__main__`)."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | int | None = None) -> None:
    """Log to stderr with timestamps; level from the argument or UNISEG_LOG_LEVEL (INFO)."""
    logging.basicConfig(
        level=level or os.environ.get("UNISEG_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
