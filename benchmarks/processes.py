"""Subprocesses of the benchmarks: a command run with its output in a log file, and the wall and
CPU time of this process and all its descendants while a block runs."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


@dataclass
class Cost:
    wall_s: float = 0.0
    cpu_s: float = 0.0


@contextmanager
def process_tree_cost(interval: float = 0.5) -> Iterator[Cost]:
    """Wall time and CPU time (user + system) of this process and all its descendants while the block runs.

    Descendants are sampled every `interval` s (a process living shorter than that is missed);
    processes alive at the start count only the CPU they use from then on.
    """
    me = psutil.Process()
    first: dict[int, float] = {}
    last: dict[int, float] = {}

    def sample(record_first: bool) -> None:
        for p in [me, *me.children(recursive=True)]:
            try:
                times = p.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            used = times.user + times.system
            if record_first:
                first[p.pid] = used
            last[p.pid] = used

    sample(record_first=True)
    stop = threading.Event()
    sampler = threading.Thread(target=lambda: [sample(False) for _ in iter(lambda: stop.wait(interval), True)],
                               daemon=True)
    cost, started = Cost(), time.perf_counter()
    sampler.start()
    try:
        yield cost
    finally:
        stop.set()
        sampler.join()
        sample(record_first=False)
        cost.wall_s = time.perf_counter() - started
        cost.cpu_s = sum(v - first.get(pid, 0.0) for pid, v in last.items())


def run_logged(command: Sequence[str | Path], env: dict[str, str] | None = None, log_file: Path | None = None) -> None:
    """Run a command; its output goes to `log_file`; a failure raises with the output's tail."""
    log.info("running %s", " ".join(map(str, command)))
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file or os.devnull, "w") as out:
        code = subprocess.run(list(map(str, command)), env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        tail = log_file.read_text()[-3000:] if log_file else ""
        raise RuntimeError(f"{command[0]} exited with {code}:\n{tail}")
