"""`python -m pipeline.ingest --verify STORE`: re-read whole stores, checking every chunk's CRC32C."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pipeline.common.cli import EXIT_BAD_INPUT, EXIT_OK
from pipeline.common.store import StoreError, TaskStore

log = logging.getLogger(__name__)


def verify_stores(uris: Sequence[str], storage_options: dict[str, Any] | None = None) -> int:
    """Check each store (format version, manifest, every array of every case); log one line per
    problem (a corrupt array, an unreadable store) and return the exit status: 0 when all are
    sound, 2 otherwise."""
    status = EXIT_OK
    for uri in uris:
        try:
            store = TaskStore.open(uri, storage_options)
            problems = store.verify()
        except StoreError as err:
            problems = [str(err)]
        for problem in problems:
            log.error("%s", problem)
        if problems:
            status = EXIT_BAD_INPUT
        else:
            log.info("%s: sound (%d cases, every chunk checked)", uri, len(store.case_ids()))
    return status
