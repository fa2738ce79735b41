"""Results files of the benchmarks: the figures of one run with where and how they were measured.

Every benchmark writes its figures through `write`: a JSON object whose `provenance` block holds the
command line, the git commit (and whether the tree had uncommitted changes), the start and end
time, the machine (CPU count and model, load average before and after, GPU, torch version) and
the seeds; the benchmark's own per-case / per-fold values sit beside it. `benchmarks/tables.py`
renders the README tables from these files.

    run = results.start(seeds=[0])
    ...                                  # measure
    results.write(path, run, {"rows": rows})
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() if done.returncode == 0 else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def _command() -> str:
    """The command line as typed (`python -m benchmarks.x ...` or `python -m benchmarks.x ...`)."""
    return shlex.join(["python", *sys.orig_argv[1:]])


def start(seeds: Sequence[int] = ()) -> dict[str, Any]:
    """The provenance of a run that starts now; `write` completes it when the run ends."""
    return {
        "command": _command(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "load_average_before": [round(v, 2) for v in os.getloadavg()],
            "gpu": _gpu(),
            "torch": _torch_version(),
            "python": platform.python_version(),
        },
        "seeds": list(seeds),
    }


def write(path: Path, run: dict[str, Any], values: dict[str, Any]) -> Path:
    """`values` with the completed provenance of `run` as one JSON file at `path`."""
    provenance = run | {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    provenance["machine"] = run["machine"] | {"load_average_after": [round(v, 2) for v in os.getloadavg()]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": provenance, **values}, indent=2) + "\n")
    return path


def read(path: Path) -> dict[str, Any]:
    """A results file; one line naming the file when it is missing, not JSON or has no provenance."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable results file ({error})") from None
    if isinstance(data, dict) and "provenance" not in data and "command" in data:
        return _legacy(data)
    if not isinstance(data, dict) or "provenance" not in data:
        raise ValueError(f"{path}: no 'provenance' block (write results files with benchmarks.results.write)")
    return data


def _legacy(data: dict[str, Any]) -> dict[str, Any]:
    """A file of benchmarks/loader.py before this module: command, commit and machine at the top."""
    machine = data.get("machine", {})
    provenance = {"command": data["command"], "commit": data.get("commit"),
                  "machine": {"cpus": machine.get("cpus"), "load_average_before": machine.get("load_average")}}
    return {"provenance": provenance} | {k: v for k, v in data.items() if k not in ("command", "commit", "machine")}
