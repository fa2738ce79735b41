"""How the training workers form their torch.distributed process group.

On a Ray whose nodes all run on this machine's loopback (the local Ray `services.connect_ray`
starts, or `ray start --node-ip-address=127.0.0.1`), nothing training opens may listen off
loopback either. Ray Train's own set-up (`TorchConfig`, env:// rendezvous) makes rank 0 serve a
TCPStore on every interface, and torch has no option to bind it; it does accept a socket that is
already listening, so rank 0 here opens one on 127.0.0.1 and hands it over. Gloo and NCCL are
pointed at the loopback interface too. A cluster with real node addresses keeps Ray's set-up:
its workers must reach rank 0 across machines.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any

import psutil
import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from pipeline.common.services import LOOPBACK, is_loopback

log = logging.getLogger(__name__)


def torch_config(use_gpu: bool) -> TorchConfig:
    """The process-group config for the connected Ray: loopback-only when every node is on loopback."""
    backend = "nccl" if use_gpu else "gloo"
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if nodes and all(is_loopback(node["NodeManagerAddress"]) for node in nodes):
        return LoopbackTorchConfig(backend=backend)
    return TorchConfig(backend=backend)


class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose rendezvous store and collectives listen on 127.0.0.1 only."""

    @property
    def backend_cls(self) -> type:
        return _LoopbackTorchBackend


class _LoopbackTorchBackend(_TorchBackend):
    """Ray's torch backend (shutdown, per-worker environment) with a loopback-only start."""

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        port, listen_fd = worker_group.execute_single(0, _listen_on_loopback)
        worker_group.execute(_set_torch_distributed_env_vars)
        world_size = len(worker_group)
        log.info("process group: %s, %d workers, rendezvous on %s:%d", backend_config.backend, world_size,
                 LOOPBACK, port)
        ray.get([worker_group.execute_single_async(rank, _join_process_group, backend=backend_config.backend,
                                                   world_rank=rank, world_size=world_size, port=port,
                                                   listen_fd=listen_fd if rank == 0 else None,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(world_size)])


def _listen_on_loopback() -> tuple[int, int]:
    """A socket listening on 127.0.0.1 (a free port) in this worker; returns (port, descriptor).
    The descriptor is detached: the rank-0 TCPStore takes it over in a later call."""
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    sock.listen()
    return sock.getsockname()[1], sock.detach()


def _join_process_group(backend: str, world_rank: int, world_size: int, port: int, listen_fd: int | None,
                        timeout_s: int) -> None:
    interface = loopback_interface()
    os.environ.update({"MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port),
                       "GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface})
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(LOOPBACK, port, world_size, is_master=world_rank == 0, timeout=timeout,
                          master_listen_fd=listen_fd)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


def loopback_interface() -> str:
    """The name of the network interface holding 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(address.family == socket.AF_INET and address.address == LOOPBACK for address in addresses):
            return name
    return "lo"
