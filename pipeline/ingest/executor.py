"""Where the ingest task graphs run: a local Dask cluster (default), an existing Dask scheduler
(`--scheduler ADDR`), Dask's in-process schedulers (`--scheduler synchronous|threads`, for
debugging and tests) or the Ray cluster through Dask on Ray (`--on-ray`, ray.util.dask). A local
Dask cluster (scheduler, workers, dashboard) or local Ray started here listens on `cfg.host` only
(127.0.0.1 unless `--host` says otherwise; pipeline/common/services.py).

`executor(cfg)` yields one function, `compute(tasks) -> results`, that runs a list of Dask
delayed objects (sharing their common inputs) and returns their values in order; `task` and
`shared` build them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dask
from dask.delayed import Delayed
from distributed import Client, LocalCluster, progress

from pipeline.common.config import IngestConfig
from pipeline.common.services import connect_ray, dask_cluster_options

log = logging.getLogger(__name__)
Compute = Callable[[list[Delayed]], list[Any]]
LOCAL_SCHEDULERS = ("synchronous", "threads")


def task(fn: Any, *args: Any, key: str) -> Delayed:
    """`fn(*args)` as a graph node named `key` (impure: run every time)."""
    return dask.delayed(fn, pure=False)(*args, dask_key_name=key)


def shared(values: tuple, key: str) -> list[Delayed]:
    """Values every task needs, as one graph node (sent once per worker, not embedded per task)."""
    node = dask.delayed(values, name=key, traverse=False)
    return [node[i] for i in range(len(values))]


@contextmanager
def executor(cfg: IngestConfig) -> Iterator[Compute]:
    if cfg.on_ray:
        with _ray(cfg.host) as compute:
            yield compute
    elif cfg.scheduler in LOCAL_SCHEDULERS:
        yield lambda tasks: list(dask.compute(*tasks, scheduler=cfg.scheduler))
    elif cfg.scheduler:
        log.info("using the Dask scheduler at %s", cfg.scheduler)
        with Client(cfg.scheduler) as client:
            yield lambda tasks: _compute_distributed(client, tasks)
    else:
        workers = cfg.num_workers or os.cpu_count() or 1
        log.info("starting a local Dask cluster with %d workers", workers)
        with (
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                         **dask_cluster_options(cfg.host)) as cluster,
            Client(cluster) as client,
        ):
            log.info("Dask dashboard: %s", client.dashboard_link)
            yield lambda tasks: _compute_distributed(client, tasks)


def _compute_distributed(client: Client, tasks: list[Delayed]) -> list[Any]:
    futures = client.compute(tasks)
    if sys.stdout.isatty():
        progress(futures)
    return client.gather(futures)


@contextmanager
def _ray(host: str) -> Iterator[Compute]:
    """Dask on Ray: the same graph, each task a Ray task (joins RAY_ADDRESS / `ray job submit`,
    else a local Ray on `host`)."""
    import ray
    from ray.util.dask import ray_dask_get

    started = connect_ray(None, host)
    log.info("running ingest tasks on Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
    try:
        yield lambda tasks: list(dask.compute(*tasks, scheduler=ray_dask_get))
    finally:
        if started:
            ray.shutdown()
