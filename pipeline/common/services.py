"""The services a stage starts on this machine listen on loopback unless the user names a host.

Every stage that starts a local Ray (train, tune, ingest `--on-ray`, predict `--ray`) or a local
Dask cluster (ingest) starts it through this module, bound to `host` (default 127.0.0.1; the
`ray.host` config key, or `--host` on ingest and predict). Joining an existing cluster
(`ray.address`, `--ray-address`, RAY_ADDRESS as `ray job submit` sets it) starts nothing here.

Ray: a node whose IP is 127.0.0.1 binds all its processes to loopback (GCS, raylet and object
manager, workers, the dashboard, its agents and metrics endpoints). Ray 2.60 replaces a loopback
`_node_ip_address` by the machine's address, except in its single-machine mode (its default on
macOS and Windows, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`), which is switched on for the start of
a loopback node only. With another host the dashboard binds to it, and Ray's core gRPC servers
to every interface (Ray has no option for those); its token authentication then guards them.

The local Ray gets a fixed GCS port and RAY_ADDRESS in the environment its processes inherit:
Ray helpers that find "the" cluster by address (Ray Train removes a stopped run's placement
group from such an actor) otherwise fail when several Ray instances run on one machine.

Token: Ray 2.60 turns token authentication on for a new local cluster and writes a new token to
~/.ray/auth_token with the process umask (mode 0644: any local user could read it). Before Ray
is started or joined here, the token file (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is made the
owner's only: written 0600 when a new local Ray would create it, tightened when it exists.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ALL_INTERFACES = ("0.0.0.0", "::")
TOKEN_MODE = 0o600
_SINGLE_MACHINE_MODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": node IP 127.0.0.1, as on macOS / Windows


def is_loopback(host: str) -> bool:
    """Whether `host` (an IP address or "localhost") is this machine's loopback interface."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def connect_ray(address: str | None = None, host: str = LOOPBACK, **init_kwargs: Any) -> bool:
    """Join `address` (or RAY_ADDRESS); without one, or with "local", start a local Ray bound to
    `host`. "auto" joins the cluster `ray start` runs on this machine. Returns True when this call
    connected (the caller then calls `ray.shutdown()`), False when Ray was connected already."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers use this venv, never `uv run`
    address = cluster_address(address)
    if address:
        log.info("connecting to Ray at %s", address)
        private_token_file(create=False)
        ray.init(address=address, **init_kwargs)
    else:
        start_local_ray(host, **init_kwargs)
    return True


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster to join: `address`, else RAY_ADDRESS; None (start a local Ray) when neither
    is set or it is "local"."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def start_local_ray(host: str = LOOPBACK, **init_kwargs: Any) -> None:
    """A new single-node Ray whose processes and dashboard listen on `host` (see the module doc)."""
    import ray

    private_token_file(create=True)
    loopback = is_loopback(host)
    node_ip = None if loopback or host in ALL_INTERFACES else host
    port = free_port()
    # Loopback reaches the GCS whatever `host` is: on another host it listens on every interface.
    env = {"RAY_ADDRESS": f"{LOOPBACK}:{port}", "RAY_GCS_SERVER_PORT": str(port)}
    log.info("starting a local Ray listening on %s (GCS port %d)", host, port)
    with environment(env), single_machine_mode(loopback):
        ray.init(address="local", _node_ip_address=node_ip, dashboard_host=host, **init_kwargs)


@contextlib.contextmanager
def single_machine_mode(on: bool = True) -> Iterator[None]:
    """Ray's single-machine mode for the duration (when `on`): Ray then keeps 127.0.0.1 as a node's
    and an address's IP instead of replacing it by the machine's network address."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    with environment({_SINGLE_MACHINE_MODE: "0"} if on else {}):
        ray_constants.ENABLE_RAY_CLUSTER = saved and not on
        try:
            yield
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on `host` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def dask_cluster_options(host: str = LOOPBACK) -> dict[str, str]:
    """LocalCluster keywords: scheduler, workers and the dashboard (a free port) on `host`."""
    dashboard = f"[{host}]:0" if ":" in host else f"{host}:0"
    return {"host": host, "dashboard_address": dashboard}


def token_path() -> Path:
    """Where Ray reads its authentication token: RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def private_token_file(create: bool) -> Path | None:
    """Make the token file mode 0600: tighten an existing one; with `create` (a new local Ray,
    token authentication not disabled, no RAY_AUTH_TOKEN) write a new token 0600 before Ray
    would write it 0644. Returns the file, or None when there is none."""
    path = token_path()
    wanted = create and not os.environ.get("RAY_AUTH_TOKEN") and os.environ.get("RAY_AUTH_MODE", "token") == "token"
    if not path.exists() and wanted:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process wrote it first: tightened below
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, TOKEN_MODE)
            with os.fdopen(descriptor, "w") as f:
                f.write(secrets.token_hex(32))
            log.info("wrote a new Ray authentication token to %s (mode 0600)", path)
    if not path.exists():
        return None
    if path.stat().st_mode & 0o077:
        path.chmod(TOKEN_MODE)
        log.warning("%s: was readable by other users; set to mode 0600", path)
    return path


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (child processes started meanwhile keep them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
