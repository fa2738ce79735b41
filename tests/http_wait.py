"""Wait for a server a test started (a Ray head, `mlflow models serve`) to answer HTTP."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Return once `url` answers (any HTTP status: 401 without a token is an answer too); raise
    RuntimeError with the end of `log` if `process` exits first, TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args))} exited with {process.returncode}:\n"
                               f"{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:  # it answers
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url}: no answer after {timeout_s:g} s:\n{log.read_text()[-3000:]}")
