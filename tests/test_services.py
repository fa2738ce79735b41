"""Services the stages start listen on loopback only, and Ray's token file is the owner's only.

The slow test runs `pipeline.ingest` (a local Dask cluster) and `pipeline.train` (a local Ray,
started by the same `services.connect_ray` as ingest `--on-ray`, tune and predict `--ray`) as
subprocesses, and while each runs lists the listening sockets of its whole process tree with
psutil; every one must be on 127.0.0.1 / ::1.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.common.services import cluster_address, dask_cluster_options, is_loopback, private_token_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_token_file_is_written_0600_before_a_local_ray(home: Path) -> None:
    path = private_token_file(create=True)
    assert path == home / ".ray" / "auth_token"
    assert _mode(path) == 0o600 and len(path.read_text()) == 64
    assert private_token_file(create=True).read_text() == path.read_text()  # kept, not replaced


def test_a_readable_token_file_is_tightened(home: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = home / "cluster_token"
    path.write_text("secret")
    path.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert private_token_file(create=False) == path
    assert _mode(path) == 0o600 and path.read_text() == "secret"
    assert "was readable by other users" in caplog.text


def test_no_token_file_when_joining_or_auth_disabled(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert private_token_file(create=False) is None  # joining a cluster never invents a token
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert private_token_file(create=True) is None
    assert not (home / ".ray").exists()


def test_host_helpers() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7")
    assert dask_cluster_options() == {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    assert dask_cluster_options("::1")["dashboard_address"] == "[::1]:0"


def test_cluster_address_joins_only_a_named_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None and cluster_address("local") is None
    assert cluster_address("ray://head:10001") == "ray://head:10001"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # as `ray job submit` sets it
    assert cluster_address(None) == "10.0.0.5:6379"
    assert cluster_address("local") is None


# --- the listening sockets of running stages --------------------------------------------


TRAINING_PROCESSES = ("_run_train_fn", "RayTrainWorker", "pt_data_worker")  # a Train worker, its loaders


def _listening(pid: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every TCP listener and bound UDP socket of `pid`'s tree."""
    try:
        root = psutil.Process(pid)
        tree = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for conn in psutil.net_connections("inet"):
        listening = conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr)
        if conn.pid in tree and listening and conn.laddr:
            try:
                name = tree[conn.pid].name()
            except psutil.Error:
                name = "?"
            found.add((conn.laddr.ip, conn.laddr.port, name))
    return found


def _run_and_watch(command: list[str], env: dict[str, str], timeout: float = 600) -> set[tuple[str, int, str]]:
    """Run `command`, sampling its listening sockets every half second until it exits (status 0)."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    seen: set[tuple[str, int, str]] = set()
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        seen |= _listening(process.pid)
        time.sleep(0.5)
    if process.poll() is None:
        process.terminate()  # SIGTERM: the stage shuts its Ray / Dask down
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output[-3000:]
    return seen


def _off_loopback(seen: set[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)
        return (mapped or address).is_loopback

    return sorted(s for s in seen if not loopback(s[0]))


@pytest.mark.slow
def test_ingest_and_train_listen_on_loopback_only(raw_msd: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "HOME": str(home), "RAY_raylet_start_wait_time_s": "180"}  # a busy machine starts Ray slowly
    stores = tmp_path / "stores"
    ingest = [sys.executable, "-m", "pipeline.ingest", "--source", str(raw_msd), "--out", str(stores),
              "--num-workers", "1"]
    dask = _run_and_watch(ingest, env)
    assert dask, "no listening socket seen: the probe is broken"
    assert _off_loopback(dask) == []

    train = [sys.executable, "-m", "pipeline.train", "--config", "configs/tiny-cpu.yaml",
             "--set", f"data.stores=[{stores / (raw_msd.name + '.zarr')}]", "--set", "train.epochs=1",
             "--set", "train.iterations_per_epoch=2", "--set", "train.validate_every=1", "--set", "ray.num_workers=2",
             "--set", f"ray.storage_path={tmp_path / 'ray'}", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
             "--set", "mlflow.registered_model=null"]
    trained = _run_and_watch(train, env)
    assert any(name == "gcs_server" for *_, name in trained), trained
    assert any(any(t in name for t in TRAINING_PROCESSES) for *_, name in trained), trained  # store, gloo seen
    assert _off_loopback(trained) == []
    assert _mode(home / ".ray" / "auth_token") == 0o600
