"""The per-worker training function Ray Train runs on every rank, and its small helpers.

`train_fn_per_worker(config)`: build from the config, resume from `ray.train.get_checkpoint()`,
loop over epochs (train, validate every K, checkpoint every K), report every epoch. Rank 0 logs
progress and writes checkpoints and MLflow metrics; every rank reports.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from model.presets import build_network
from model.spec import NetworkSpec
from pipeline.common.config import ExperimentConfig, config_from_dict
from pipeline.common.logs import quiet_ray_train_reports, setup_logging
from pipeline.common.metrics import metric_name
from pipeline.common.model_card import ModelCard, unwrap
from pipeline.common.store import StoreManifest, TaskStore
from pipeline.train import finetune
from pipeline.train.build import model_card, network_spec, open_stores, task_median_shapes, task_specs
from pipeline.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.train.data import Batch, BatchStream, augment_batch, make_loader, open_store
from pipeline.train.execution import Execution, Precision, find_unused_parameters, prepare_network
from pipeline.train.optim import build_optimizer, set_learning_rate
from pipeline.train.sampling import TaskSampler, build_sampler
from pipeline.train.step import train_step
from pipeline.train.mlflow_run import EpochLogger
from pipeline.train.validation import ValidationTask, format_summary, validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What the driver adds to the config: where to log, and (tests only) an injected fault."""

    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    fail_epoch: int | None = None  # kill `fail_rank` halfway through this epoch, once
    fail_rank: int = 0
    fail_marker: str | None = None  # file created when the fault fired (so it fires once)
    fail_delay_s: float = 3.0  # let the controller collect the last report before the kill


@dataclass
class EpochStats:
    loss: float
    seconds: float
    data_seconds: float
    iterations: int
    task_samples: torch.Tensor  # samples drawn per task this epoch (this rank)


@dataclass
class Parts:
    """Everything a worker builds from the config before training."""

    cfg: ExperimentConfig
    stores: list[TaskStore]
    spec: NetworkSpec
    network: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: TaskSampler
    device: torch.device
    execution: Execution  # precision, memory layout, compilation, DDP's unused-parameter search
    prior: ModelCard | None = None  # finetune.add_task: the pretrained model, whose tasks come before the stores'

    @property
    def task_offset(self) -> int:
        """The network's task id of the first store."""
        return len(self.prior.tasks) if self.prior else 0

    @property
    def manifests(self) -> list[StoreManifest]:
        return [s.manifest for s in self.stores]

    @property
    def amp(self) -> Precision:
        """The step's mixed precision (autocast dtype and loss scaling; fp32: none)."""
        return self.execution.precision


def build_parts(cfg: ExperimentConfig, rank: int, device: torch.device) -> Parts:
    """Stores, network (set up for the step, `execution.prepare_network`), optimizer, AMP scaler
    and this rank's task sampler."""
    torch.manual_seed(cfg.train.seed + rank)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed patch shapes: let cuDNN pick (nnU-Net does)
    stores = open_stores(cfg.data.stores, fold=cfg.data.fold, allow_incomplete=cfg.data.allow_incomplete_stores)
    manifests = [s.manifest for s in stores]
    prior = None
    if cfg.finetune.add_task:
        spec, network, prior, new_elements = finetune.extended_network(cfg, manifests)
    elif cfg.finetune.pretrained:
        spec, network = finetune.transferred_network(cfg, manifests)
    else:
        spec = network_spec(cfg.model, manifests, task_median_shapes(stores) if cfg.model.preset is None else None)
        network = build_network(spec, task_specs(manifests))
    network = network.to(device)
    channels = [t.in_channels for t in (prior.tasks if prior else ())] + [m.in_channels for m in manifests]
    execution = prepare_network(network, cfg.train, device, channels, spec.strides)
    if rank == 0:
        log.info("%s", execution.summary(network))
    sampler = build_sampler(
        cfg.train.sampling, [len(s.case_ids("train")) for s in stores], batches=cfg.train.iterations_per_epoch,
        batch_size=cfg.train.batch_size, mixed=cfg.train.mixed_task_batches,
        temperature=cfg.train.sampling_temperature, seed=cfg.train.seed, rank=rank,
    )
    optimizer = (finetune.build_finetune_optimizer(network, cfg.train, cfg.finetune) if finetune.transfers(cfg)
                 else build_optimizer(network.parameters(), cfg.train))
    if cfg.finetune.add_task:
        finetune.keep_old_elements(optimizer, network, new_elements)
    return Parts(cfg, stores, spec, network, optimizer, execution.precision.scaler(device), sampler, device, execution,
                 prior)


def batch_loader(parts: Parts) -> DataLoader:
    """Background loader of this rank's batches, from where the sampler stands to the end."""
    cfg = parts.cfg
    stream = BatchStream(
        parts.sampler, list(cfg.data.stores), [m.num_classes for m in parts.manifests], parts.spec.patch_size,
        cfg.train.epochs, start_epoch=parts.sampler.epoch, start_batch=parts.sampler.position,
        foreground_fraction=cfg.train.foreground_fraction, augmentation=cfg.train.augmentation,
        augment_on=cfg.train.augment_on, opener=functools.partial(open_store, fold=cfg.data.fold),
    )
    return make_loader(stream, cfg.train.loader_workers, pin_memory=parts.device.type == "cuda")


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` = {"experiment": to_dict(cfg), "context": RunContext fields}."""
    setup_logging()
    quiet_ray_train_reports()
    started = time.perf_counter()
    cfg = config_from_dict(config["experiment"], source="train_loop_config")
    context = RunContext(**config.get("context", {}))
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    parts = build_parts(cfg, rank, ray.train.torch.get_device())
    state = resume(ray.train.get_checkpoint(), parts)
    if rank == 0:
        log.info("%s: %d tasks (%s), %s, %.2f M parameters, %d worker(s) on %s, start at epoch %d/%d",
                 cfg.name, len(parts.stores), ", ".join(m.task_name for m in parts.manifests),
                 parts.spec.architecture, sum(p.numel() for p in parts.network.parameters()) / 1e6, world,
                 parts.device.type, state.epoch, cfg.train.epochs)
    if state.epoch >= cfg.train.epochs:
        if rank == 0:
            log.info("nothing to do: the checkpoint already finished %d epochs", state.epoch)
        return
    model = None
    batches = iter(batch_loader(parts))
    tracker = EpochLogger(context.tracking_uri, context.mlflow_run_id) if rank == 0 and context.mlflow_run_id else None
    if rank == 0:
        log.info("ready to train after %.1f s", time.perf_counter() - started)
    run_started, first_epoch = time.perf_counter(), state.epoch  # state.epoch moves at each checkpoint
    for epoch in range(first_epoch, cfg.train.epochs):
        lr = set_learning_rate(parts.optimizer, cfg.train, epoch)
        if finetune.transfers(cfg):
            lr = finetune.apply_schedule(parts.optimizer, cfg.finetune, epoch, lr)
        if model is None or (finetune.transfers(cfg) and finetune.freeze_encoder(parts.network, cfg.finetune, epoch)):
            model = None  # drop the old DDP wrapper (and its gradient hooks) before building a new one
            model = wrap_model(parts, epoch)
        stats = train_epoch(model, batches, parts, epoch, context, rank)
        metrics, own = epoch_metrics(stats, lr, world, [m.task_name for m in parts.manifests])
        if rank == 0:
            eta = run_eta(time.perf_counter() - run_started, first_epoch, epoch, cfg.train.epochs)
            log.info("epoch %d/%d done: loss %.4f, %.2f it/s, %.1f samples/s (all ranks), data wait %.0f%%, "
                     "%.1f s, run ETA %s", epoch + 1, cfg.train.epochs, metrics["train/loss"],
                     metrics["train/iterations_per_s"], metrics["train/samples_per_s"],
                     100 * metrics["train/data_wait_fraction"], stats.seconds, format_seconds(eta))
        last = epoch + 1 == cfg.train.epochs
        if (epoch + 1) % cfg.train.validate_every == 0 or last:
            metrics.update(validate_epoch(model, parts, epoch, rank, world))
        state.history.append({"epoch": float(epoch), **metrics})
        if tracker is not None and (any(k.startswith("dice/") for k in metrics) or last):
            tracker.log_plots(state.history)
        report = metrics | own | {"epoch": epoch}
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or last:
            state.epoch = epoch + 1
            report_with_checkpoint(report, parts, state, rank)
        else:
            ray.train.report(report)


def wrap_model(parts: Parts, epoch: int) -> nn.Module:
    """The network ready for `epoch` (DDP over the parameters that train in it, when world > 1;
    searching for unused ones only when some can get no gradient, `execution.find_unused_parameters`)."""
    if finetune.transfers(parts.cfg):
        finetune.freeze_encoder(parts.network, parts.cfg.finetune, epoch)
    unused = find_unused_parameters(parts.network, parts.execution.unreached)
    return ray.train.torch.prepare_model(parts.network, parallel_strategy_kwargs={"find_unused_parameters": unused})


def run_eta(elapsed_s: float, first_epoch: int, epoch: int, epochs: int) -> float:
    """Seconds left after 0-based `epoch`, at the mean pace of the epochs this run did since `first_epoch`."""
    return elapsed_s / (epoch + 1 - first_epoch) * (epochs - epoch - 1)


def validate_epoch(model: nn.Module, parts: Parts, epoch: int, rank: int, world: int) -> dict[str, float]:
    """Per-task, per-class Dice on every store's validation split (cases shared among ranks)."""
    started = time.perf_counter()
    offset = parts.task_offset
    tasks = [ValidationTask(offset + i, s.manifest.task_name, s.manifest.labels, tuple(s.case_ids("validation")))
             for i, s in enumerate(parts.stores)]
    metrics = validate(unwrap(model), tasks, lambda task, case: parts.stores[task - offset].read_case(case),
                       parts.spec.patch_size, rank=rank, world_size=world, amp_dtype=parts.amp.dtype)
    if rank == 0:
        log.info("epoch %d validation: %s (%.1f s)", epoch + 1, format_summary(metrics), time.perf_counter() - started)
    return metrics


def resume(checkpoint: ray.train.Checkpoint | None, parts: Parts) -> TrainState:
    """Restore weights, optimizer, scaler, sampler and RNG from a checkpoint (or start fresh)."""
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(directory, parts.network, parts.device)
    parts.optimizer.load_state_dict(state.optimizer)
    if state.scaler:
        parts.scaler.load_state_dict(state.scaler)
    sampler = parts.sampler
    sampler.load_state_dict(state.sampler)
    if (sampler.epoch, sampler.position) != (state.epoch, 0):
        raise ValueError(f"checkpoint is inconsistent: epoch {state.epoch}, sampler at {sampler.epoch}/{sampler.position}")
    state.restore_rng()
    log.info("resumed from checkpoint %s at epoch %d", checkpoint.path, state.epoch)
    return state


def train_epoch(model: nn.Module, batches: Iterator[Batch], parts: Parts, epoch: int, context: RunContext,
                rank: int) -> EpochStats:
    """One epoch of `train.iterations_per_epoch` steps; rank 0 logs progress every `log_every`."""
    cfg = parts.cfg
    model.train()
    total = cfg.train.iterations_per_epoch
    loss_sum = torch.zeros((), device=parts.device)
    started = time.perf_counter()
    data_seconds = 0.0
    task_samples = torch.zeros(len(parts.stores), dtype=torch.long)
    for i in range(total):
        if epoch == context.fail_epoch and rank == context.fail_rank and i == total // 2:
            inject_failure(context)
        waited = time.perf_counter()
        batch = next(batches)
        data_seconds += time.perf_counter() - waited
        if cfg.train.augment_on == "device":
            batch = augment_batch(batch, parts.device)
        task_samples += torch.bincount(batch["task"], minlength=len(parts.stores))
        batch["task"] = batch["task"] + parts.task_offset  # store index -> the network's task id
        loss_sum += train_step(model, batch, parts.optimizer, parts.scaler, parts.device, parts.amp,
                               cfg.train.loss, cfg.train.grad_clip, parts.execution.memory_format)
        parts.sampler.advance()
        if rank == 0 and (i + 1) % cfg.train.log_every == 0 and i + 1 < total:
            elapsed = time.perf_counter() - started
            log.info("epoch %d/%d [%d/%d] loss %.4f, %.2f it/s, epoch ETA %s", epoch + 1, cfg.train.epochs, i + 1,
                     total, loss_sum.item() / (i + 1), (i + 1) / elapsed, format_seconds(elapsed / (i + 1) * (total - i - 1)))
    return EpochStats(loss_sum.item() / total, time.perf_counter() - started, data_seconds, total, task_samples)


def epoch_metrics(stats: EpochStats, lr: float, world: int,
                  task_names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(all ranks, this rank) metrics of an epoch.

    All ranks, the same on every rank: `train/loss` and `train/data_wait_fraction` averaged over
    ranks, `train/samples_per_s` and `samples/<task>` summed, `train/iterations_per_s` the job's
    step rate (ranks step together), `train/world_size`, `train/lr`. This rank's own:
    `rank/loss`, `rank/data_wait_fraction`, `rank/samples_per_s`, on CUDA `rank/gpu_memory_gib`
    (the peak allocated so far) (MLflow: `rank<r>/...`).
    """
    samples = stats.task_samples.double()
    local = torch.cat([torch.tensor([stats.loss, stats.data_seconds / stats.seconds,
                                     samples.sum().item() / stats.seconds], dtype=torch.float64), samples])
    values = local.clone()
    if world > 1 and dist.is_initialized():
        values = values.to(_collective_device())
        dist.all_reduce(values)
        values = values.cpu()
        values[:2] /= world
    everyone = {
        "train/loss": float(values[0]),
        "train/lr": lr,
        "train/iterations_per_s": stats.iterations / stats.seconds,
        "train/samples_per_s": float(values[2]),
        "train/data_wait_fraction": float(values[1]),
        "train/world_size": float(world),
    } | {f"samples/{metric_name(name)}": float(n) for name, n in zip(task_names, values[3:])}
    own = {"rank/loss": float(local[0]), "rank/data_wait_fraction": float(local[1]),
           "rank/samples_per_s": float(local[2])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        own["rank/gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return everyone, own


def report_with_checkpoint(metrics: dict[str, float], parts: Parts, state: TrainState, rank: int) -> None:
    """Rank 0 writes the checkpoint (a model folder plus train state); every rank reports."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            state.optimizer = parts.optimizer.state_dict()
            state.scaler = parts.scaler.state_dict()
            state.sampler = parts.sampler.state_dict()
            state.capture_rng()
            card = model_card(parts.cfg, parts.spec, parts.manifests, state.epoch, parts.prior)
            save_checkpoint(tmp, parts.network, card, state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def inject_failure(context: RunContext) -> None:
    """Kill this worker process once (fault-tolerance tests): a marker file records the kill.

    Reports reach the Ray Train controller at its next poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    2 s by default); a worker lost before that loses the last checkpoint and the run resumes from
    the one before. The delay keeps the test about restarts, not about that race.
    """
    marker = Path(context.fail_marker or Path(tempfile.gettempdir()) / "uniseg-fail-marker")
    if marker.exists():
        return
    time.sleep(context.fail_delay_s)
    marker.write_text(str(os.getpid()))
    log.warning("injected failure: killing worker pid %d", os.getpid())
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

