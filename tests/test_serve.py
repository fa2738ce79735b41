"""`mlflow models serve` of a registered model from a venv built from the model's own requirements.

The venv lies outside the checkout and gets only `mlflow.pyfunc.get_model_dependencies` (plus
torch==2.13.0, named so pip takes the CPU build from local disk, as the Makefile does); the
server runs from a temporary folder with no PYTHONPATH, so the checkout is not on its sys.path
and the model's own code (its `code_paths`) is what runs. A real scan goes over HTTP as base64
NIfTI bytes and the label map that comes back must equal `pipeline.predict`'s for the same scan.
The model and its SQLite store are test_predict_world's (built once per session).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest

from http_wait import wait_for_http
from pipeline.common.inference import InferenceOptions
from pipeline.common.nifti import from_bytes
from pipeline.common.services import LOOPBACK, free_port
from pipeline.predict.run import PredictOptions, run
from test_predict_world import LIVER, World, single_thread, world  # noqa: F401 (fixtures)

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the Makefile's TORCH
START_TIMEOUT_S = 300
SCAN = "synthliver_002"  # a validation case, ASL-oriented, 1.5 x 1.5 x 5 mm


def _environment(tracking_uri: str, venv: Path) -> dict[str, str]:
    """This environment minus anything that points Python at the checkout or the project venv."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode:
        raise AssertionError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def served(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    """The URL of `mlflow models serve -m models:/tiny-uniseg@champion`, run from a fresh venv."""
    root = tmp_path_factory.mktemp("serve")
    assert ROOT not in root.parents, "the serving venv must lie outside the checkout"
    venv, workdir = root / "venv", root / "cwd"
    workdir.mkdir()
    env = _environment(world.tracking_uri, venv)
    mlflow.set_tracking_uri(world.tracking_uri)
    requirements = mlflow.pyfunc.get_model_dependencies(world.model_uri)
    started = time.monotonic()
    _run([sys.executable, "-m", "venv", str(venv)], workdir, env, 120)
    # --no-compile: byte-compiling every installed module (torch, mlflow) is most of the install's CPU
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile", "-r", requirements, TORCH],
         workdir, env, 900)
    log.info("serving venv from the model's requirements: %.0f s", time.monotonic() - started)
    probe = "import importlib.util as u; print(u.find_spec('pipeline'), u.find_spec('model'))"
    assert _run([str(venv / "bin" / "python"), "-c", probe], workdir, env, 60).split() == ["None", "None"], \
        "the checkout (or the project) is importable in the serving venv"

    port = free_port()
    server = subprocess.Popen(
        [str(venv / "bin" / "mlflow"), "models", "serve", "-m", world.model_uri, "--env-manager", "local",
         "--host", LOOPBACK, "--port", str(port), "--workers", "1"],
        cwd=workdir, env=env, stdout=(root / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_for_http(f"{url}/ping", server, root / "server.log", START_TIMEOUT_S)
        log.info("venv and server up: %.0f s", time.monotonic() - started)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker, started by this fixture
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.mark.slow
def test_served_label_map_equals_pipeline_predict(served: str, world: World, tmp_path: Path) -> None:  # noqa: F811
    scan = world.raw[LIVER.name] / "imagesTr" / f"{SCAN}.nii.gz"
    body = {"dataframe_records": [{"task": LIVER.name, "image": base64.b64encode(scan.read_bytes()).decode()}]}
    status, answer = _post(served, body)
    assert status == 200, answer
    (row,) = answer["predictions"]
    labels = from_bytes(base64.b64decode(row["labels"]))

    run(PredictOptions(model=world.model_uri, task=LIVER.name, input=scan, output=tmp_path, inference=InferenceOptions(),
                       tracking_uri=world.tracking_uri))  # the pyfunc's default: no TTA, overlap 0.5
    expected = nib.load(tmp_path / f"{SCAN}.nii.gz")
    assert labels.shape == expected.shape == nib.load(scan).shape
    np.testing.assert_array_equal(np.asarray(labels.dataobj), np.asarray(expected.dataobj))
    assert set(np.unique(np.asarray(labels.dataobj))) >= {0, 1}  # it found liver: not a trivial map
    np.testing.assert_allclose(labels.affine, expected.affine, atol=1e-6)
    np.testing.assert_allclose(np.array(row["affine"]), nib.load(scan).affine, atol=1e-6)
    assert json.loads(row["classes"]) == {"0": "background", "1": "liver", "2": "tumour"}


@pytest.mark.slow
def test_bad_request_is_400_naming_the_row(served: str) -> None:
    status, answer = _post(served, {"dataframe_records": [{"task": "lung", "path": "/x.nii.gz"}]})
    assert status == 400 and "row 0: unknown task 'lung'" in answer["message"], answer
