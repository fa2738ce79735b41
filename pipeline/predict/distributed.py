"""Batch prediction on Ray: the scans are spread over actors, each holding one copy of the model.

The driver ships the weights (safetensors bytes) and the card (JSON) through the object store,
so workers need neither MLflow nor the model folder; they do need the input and output folders
(a shared file system). Each worker writes its scan's outputs atomically, so a worker lost
mid-scan (its node gone) leaves no half-written output; its scan runs again on another worker. Inside
`ray job submit` the job's cluster is joined; elsewhere a local Ray is started, listening on
`RayOptions.host` only (127.0.0.1 unless `--host` says otherwise; pipeline/common/services.py).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import ray
import torch
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from safetensors.torch import load as load_weights
from safetensors.torch import save as save_weights
from torch import nn
from tqdm.auto import tqdm

from pipeline.common.inference import InferenceOptions, resolve_device
from pipeline.common.model_card import ModelCard, build_from_card, unwrap
from pipeline.common.services import LOOPBACK, connect_ray
from pipeline.predict.job import Job, Outcome, attempt_job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS, the job's cluster, or a new local one
    num_workers: int | None = None  # None: as many as the cluster's CPUs (GPUs) allow
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    device: str = "auto"  # resolved on each worker
    host: str = LOOPBACK  # interface a local Ray started here listens on


class PredictWorker:
    """A Ray actor: rebuilds the network once, then runs jobs."""

    def __init__(self, weights: bytes, card_json: str, device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.card = ModelCard.from_json(card_json)
        network = build_from_card(self.card)
        network.load_state_dict(load_weights(weights))
        self.network = network.to(resolve_device(device)).eval()

    def run(self, job: Job, options: InferenceOptions) -> Outcome:
        return attempt_job(self.network, self.card, job, options)


def run_on_ray(
    network: nn.Module, card: ModelCard, jobs: Sequence[Job], options: InferenceOptions, ray_options: RayOptions
) -> Iterator[Outcome]:
    """Run every job on Ray actors and yield each outcome as it comes (a failed scan is an
    outcome, not an error). A worker lost with its node is dropped and its scan goes to another
    worker; outputs already written stay (each scan's are renamed into place whole). Raises
    RuntimeError when every worker is lost."""
    started = connect_ray(ray_options.address, ray_options.host, log_to_driver=True)
    workers = []
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in unwrap(network).state_dict().items()}
        weights = ray.put(save_weights(state))
        count = min(len(jobs), ray_options.num_workers or _default_workers(ray_options))
        actor = ray.remote(PredictWorker).options(
            num_cpus=ray_options.cpus_per_worker, num_gpus=ray_options.gpus_per_worker
        )
        threads = max(1, int(ray_options.cpus_per_worker))
        workers = [actor.remote(weights, card.to_json(), ray_options.device, threads) for _ in range(count)]
        log.info("predicting %d scan(s) on %d Ray worker(s)", len(jobs), count)
        results = _schedule(list(workers), jobs, options)
        yield from tqdm(results, total=len(jobs), desc="scans", disable=None)
    finally:
        for worker in workers:
            ray.kill(worker)
        if started:
            ray.shutdown()


def _schedule(workers: list[ActorHandle], jobs: Sequence[Job], options: InferenceOptions) -> Iterator[Outcome]:
    """One job at a time per worker, outcomes as they come; a job whose worker died is queued again."""
    queue, idle = deque(jobs), deque(workers)
    running: dict[ray.ObjectRef, tuple[ActorHandle, Job]] = {}
    while queue or running:
        while queue and idle:
            worker, job = idle.popleft(), queue.popleft()
            running[worker.run.remote(job, options)] = (worker, job)
        if not running:
            raise RuntimeError(f"every Ray worker was lost; {len(queue)} scan(s) not predicted")
        [ready], _ = ray.wait(list(running), num_returns=1)
        worker, job = running.pop(ready)
        try:
            outcome = ray.get(ready)
        except RayActorError as err:
            log.warning("%s: its Ray worker was lost (%s); predicting it on another worker",
                        job.scan.name, type(err).__name__)
            queue.appendleft(job)
            continue
        idle.append(worker)
        yield outcome


def _default_workers(ray_options: RayOptions) -> int:
    resources = ray.cluster_resources()
    if ray_options.gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0) // ray_options.gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // ray_options.cpus_per_worker))
