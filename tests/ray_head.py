"""A real one-node Ray cluster for tests: `ray start --head` on 127.0.0.1 with its dashboard
(the job API) and token authentication, in its own temp dir and process session. Teardown kills
that session only (never `ray stop`, which would stop every Ray on the machine)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from http_wait import wait_for_http
from pipeline.common.services import free_port

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180
AGENT_TIMEOUT_S = 420  # the job agent can start minutes after the dashboard on a loaded machine
# On a loaded machine the dashboard may drop the websocket `ray job submit` tails the logs over;
# the job itself runs on, so the test then waits for it through `ray job status`.
LOG_TAIL_DROPPED = "WebSocket connection closed unexpectedly"
JOB_ID = re.compile(r"raysubmit_\w+")
ENDED = re.compile(r"Job '\w+' (succeeded|failed|was stopped)")  # `ray job status` once the job has ended


@dataclass(frozen=True)
class RayHead:
    url: str  # dashboard / job API
    env: dict[str, str]  # environment for `ray` commands (venv first on PATH, auth token)

    def submit(self, entrypoint: Sequence[str], cwd: Path, working_dir: bool = True, timeout: float = 540) -> subprocess.CompletedProcess:
        """`ray job submit` (waits for the job); retried while the job agent is still starting."""
        command = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.url]
        command += ["--working-dir", "."] if working_dir else []
        deadline = time.monotonic() + AGENT_TIMEOUT_S
        while True:
            job = subprocess.run([*command, "--", *entrypoint], cwd=cwd, env=self.env, capture_output=True,
                                 text=True, timeout=timeout)
            output = job.stdout + job.stderr
            if LOG_TAIL_DROPPED in output and (submitted := JOB_ID.search(output)):
                return self._wait_for(submitted[0], cwd, timeout)
            if "No available agent" not in output or time.monotonic() > deadline:
                return job
            time.sleep(5)

    def _wait_for(self, job_id: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """The submitted job's end, as `ray job submit` would have reported it: its logs, then
        "Job '<id>' succeeded" (exit 0) or how it ended (exit 1)."""
        ray = [str(VENV_BIN / "ray"), "job"]
        deadline = time.monotonic() + timeout
        ended = None
        while ended is None and time.monotonic() < deadline:
            time.sleep(5)
            status = subprocess.run([*ray, "status", "--address", self.url, job_id], cwd=cwd, env=self.env,
                                    capture_output=True, text=True)
            ended = ENDED.search(status.stdout + status.stderr)
        logs = subprocess.run([*ray, "logs", "--address", self.url, job_id], cwd=cwd, env=self.env,
                              capture_output=True, text=True).stdout
        succeeded = ended is not None and ended[1] == "succeeded"
        ending = ended[0] if ended else f"Job '{job_id}' did not end within {timeout:g} s"
        return subprocess.CompletedProcess(ray, 0 if succeeded else 1, f"{logs}\n{ending}\n", "")


@contextmanager
def ray_head(num_cpus: int = 2, extra_env: dict[str, str] | None = None) -> Iterator[RayHead]:
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-test-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32), "OMP_NUM_THREADS": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env |= extra_env or {}
    command = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--node-ip-address",
               "127.0.0.1", "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
               str(dashboard), "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", str(num_cpus), "--temp-dir", temp_dir, "--disable-usage-stats"]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_http(f"{url}/api/version", head, log_path, START_TIMEOUT_S)
        yield RayHead(url, env)
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
