"""Batch prediction as a Ray job: `ray job submit -- python -m pipeline.predict ... --num-workers 2`.

A Ray head (with its dashboard, which serves the job API) is started for this module only, with
its own temp dir and a fresh auth token, in its own process session; teardown signals that
session only (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.common.metrics import dice
from test_predict_world import LIVER, World, build_world

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.getbasetemp() / "predict-world")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_dashboard(url: str, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # it answers (e.g. 401 before the token): it is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {url} not up after {START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """(dashboard URL, environment for `ray` commands) of a one-node cluster with 2 CPUs."""
    port, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-predict-", dir="/tmp")  # short: Ray's socket paths
    env = os.environ | {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                        "RAY_AUTH_TOKEN": secrets.token_hex(32), "OMP_NUM_THREADS": "1"}
    command = ["ray", "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
               "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats"]
    with open(Path(temp_dir) / "ray-start.log", "w") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(url, head)
        yield url, env
    finally:
        _stop(head)


def _stop(head: subprocess.Popen) -> None:
    """SIGKILL to the head's process group: the node's processes (GCS, raylet, dashboard,
    workers) all run in it; nothing outlives the test."""
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait()


def _submit(url: str, env: dict[str, str], entrypoint: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the node's job agent is still starting."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        job = subprocess.run(["ray", "job", "submit", "--address", url, "--", *entrypoint], env=env,
                             capture_output=True, text=True, timeout=540)
        if "No available agent" not in job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(2)


@pytest.mark.slow
def test_batch_of_scans_as_a_ray_job(world: World, ray_cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = ray_cluster
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    cases = [f"synthliver_{i:03d}" for i in range(5)]
    for case in cases:
        (inputs / f"{case}.nii.gz").symlink_to(world.raw[LIVER.name] / "imagesTr" / f"{case}.nii.gz")
    entrypoint = ["python", "-m", "pipeline.predict", "--model", world.model_uri, "--tracking-uri", world.tracking_uri,
                  "--task", LIVER.name, "-i", str(inputs), "-o", str(output), "--tta", "off", "--num-workers", "2"]
    job = _submit(url, env, entrypoint)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "on 2 Ray worker(s)" in job.stdout + job.stderr
    assert sorted(p.name for p in output.iterdir()) == sorted(f"{c}{e}" for c in cases for e in (".json", ".nii.gz"))
    for case in cases:
        image = nib.load(inputs / f"{case}.nii.gz")
        labels = nib.load(output / f"{case}.nii.gz")
        assert labels.shape == image.shape and np.allclose(labels.affine, image.affine)
        truth = nib.load(world.raw[LIVER.name] / "labelsTr" / f"{case}.nii.gz")
        assert dice(np.asarray(labels.dataobj), np.asarray(truth.dataobj), 1) > 0.7
