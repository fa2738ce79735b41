"""The model step alone (`python -m benchmarks.train_step --model-only`): a random batch of one of
the 11 reference tasks, no stores, no Ray, timed in each step setting (precision, channels-last,
torch.compile) from the same seed, beside the reference's epoch time and memory, with the step's
FLOPs and model FLOP utilisation. `timed_steps` also times train_step.py's cached-batch step."""

from __future__ import annotations

import argparse
import gc
import logging
import re
import time
from typing import Any

import torch

from model.presets import REFERENCE_TASKS, build_network, preset_spec
from pipeline.common.config import TrainConfig
from pipeline.train.data import Batch, collate
from pipeline.train.execution import Precision, prepare_network
from pipeline.train.loss import deep_supervision_loss
from pipeline.train.optim import build_optimizer
from pipeline.train.step import train_step

log = logging.getLogger("benchmarks.train_step")

# The UniSeg reference trains 550 iterations per epoch in about 210 s and 10 GB on one GPU.
REFERENCE_EPOCH = {"iterations": 550, "seconds": 210.0, "gpu_gib": 10.0}

MODEL_WARMUP = 2  # untimed steps before --model-only's timed ones (a compilation happens in them)

# Step settings of --model-only: name -> train.precision, train.channels_last, train.compile.
SETTINGS: dict[str, tuple[str, bool, bool]] = {
    "fp32": ("fp32", False, False),
    "fp16": ("fp16", False, False),
    "bf16": ("bf16", False, False),
    "bf16-cl": ("bf16", True, False),
    "bf16-cl-compile": ("bf16", True, True),
}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by a pattern of
# torch.cuda.get_device_name(). H100/H200 PCIe and NVL parts run lower clocks: give --peak-tflops.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH(100|200)\b(?!.*(PCIe|NVL))", 989.0),  # SXM
    (r"\bA100\b", 312.0),
    (r"\bL4\b", 121.0),
)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(network: torch.nn.Module, batch: Batch, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, device: torch.device, amp: Precision, steps: int,
                layout: torch.memory_format = torch.preserve_format, warmup: int = 2) -> tuple[float, float, float]:
    """(steps/s, warm-up seconds, last loss) of `steps` training steps on one cached batch, timed
    after `warmup` steps (they hold a compilation, if any)."""
    started = time.perf_counter()
    for _ in range(warmup):
        train_step(network, batch, optimizer, scaler, device, amp, "dice_ce", 12.0, layout)
    sync_device(device)
    warmed = time.perf_counter()
    for _ in range(steps):
        loss = train_step(network, batch, optimizer, scaler, device, amp, "dice_ce", 12.0, layout)
    sync_device(device)
    return steps / (time.perf_counter() - warmed), warmed - started, loss.item()


def reference_batch(patch: tuple[int, ...], batch_size: int, task: int = 0) -> Batch:
    """A random batch of one reference task (the reference draws each batch from one task), its
    label a foreground box per class over the middle of the patch."""
    spec = REFERENCE_TASKS[task]
    generator = torch.Generator().manual_seed(task)
    labels = []
    for _ in range(batch_size):
        label = torch.zeros(patch, dtype=torch.uint8)
        for c in range(1, spec.num_classes):
            label[tuple(slice(p * c // 4, p * (c + 2) // 4) for p in patch)] = c
        labels.append(label.numpy())
    images = [torch.randn((spec.in_channels, *patch), generator=generator).numpy() + lab for lab in labels]
    return collate(images, labels, [task] * batch_size, [t.num_classes for t in REFERENCE_TASKS])


def step_flops(network: torch.nn.Module, batch: Batch, device: torch.device) -> float:
    """FLOPs of one step's forward and backward (convolutions and matrix products, as torch's
    FlopCounterMode counts them; the optimizer's elementwise update is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    image, label = batch["image"].to(device), batch["label"].to(device)
    num_classes, task = batch["num_classes"].to(device), batch["task"].to(device)
    with FlopCounterMode(display=False) as counter:
        deep_supervision_loss(network(image, batch["task"]), label, num_classes, task).backward()
    network.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The device's dense bf16 peak (`--peak-tflops` first); None when unknown."""
    if override:
        return override
    return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.search(pattern, device_name)), None)


def run_setting(name: str, args: argparse.Namespace, spec: Any, batch: Batch, device: torch.device) -> dict[str, Any]:
    """One step setting from a fresh network (seed `--seed`), set up as training sets it up."""
    precision, channels_last, compiled = SETTINGS[name]
    torch.manual_seed(args.seed)
    network = build_network(spec, REFERENCE_TASKS).to(device)
    train = TrainConfig(precision=precision, channels_last=channels_last, compile=compiled)
    execution = prepare_network(network, train, device, [t.in_channels for t in REFERENCE_TASKS], spec.strides)
    optimizer = build_optimizer(network.parameters(), train)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps_per_s, warmup_s, loss = timed_steps(network, batch, optimizer, execution.precision.scaler(device), device,
                                              execution.precision, args.steps, execution.memory_format, MODEL_WARMUP)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del network, optimizer
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"setting": name, "precision": execution.precision.name, "channels_last": channels_last,
            "compile": compiled, "steps_per_s": steps_per_s, "samples_per_s": steps_per_s * args.batch_size,
            "epoch_seconds": REFERENCE_EPOCH["iterations"] / steps_per_s, "peak_gpu_gib": peak,
            "warmup_seconds": warmup_s, "loss": loss}


def model_only_synthetic(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The model step alone on a random reference-task batch, in each of `--settings`."""
    settings = args.settings or (list(SETTINGS) if device.type == "cuda" else ["fp32"])
    if device.type != "cuda" and settings != ["fp32"]:
        raise SystemExit(f"--settings {' '.join(settings)}: off a GPU the step trains in float32 only (--gpu)")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    spec = preset_spec(args.preset, patch_size=args.patch, architecture=args.architecture)
    batch = reference_batch(spec.patch_size, args.batch_size)
    torch.manual_seed(args.seed)
    flops = step_flops(build_network(spec, REFERENCE_TASKS).to(device), batch, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    rows = []
    for setting in settings:
        try:
            rows.append(run_setting(setting, args, spec, batch, device))
        except ValueError as err:  # bf16 on a GPU without it
            log.warning("%s skipped: %s", setting, err)
    for row in rows:
        row["tflops_per_s"] = flops * row["steps_per_s"] / 1e12
        row["mfu"] = row["tflops_per_s"] / peak if peak else float("nan")
    return {"preset": args.preset, "architecture": args.architecture, "patch": "x".join(map(str, spec.patch_size)),
            "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": MODEL_WARMUP, "seed": args.seed,
            "step_tflop": flops / 1e12, "peak_bf16_tflops": peak, "device": name, "torch": torch.__version__,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32, "settings": rows}


def model_only_report(r: dict[str, Any]) -> str:
    ref = REFERENCE_EPOCH
    peak = f"dense bf16 peak {r['peak_bf16_tflops']:.0f} TFLOP/s" if r["peak_bf16_tflops"] else \
        "peak unknown (--peak-tflops)"
    fp32 = next((row["loss"] for row in r["settings"] if row["setting"] == "fp32"), float("nan"))
    lines = [
        f"{r['preset']} {r['architecture']}, patch {r['patch']}, batch {r['batch_size']}, {r['device']} ({peak}), "
        f"torch {r['torch']}: model step alone, one random batch, no loader, {r['warmup_steps']} warm-up + "
        f"{r['steps']} timed steps per setting, each from seed {r['seed']}",
        f"forward + backward: {r['step_tflop']:.3f} TFLOP per step (FlopCounterMode); MFU = TFLOP/s / peak; "
        f"reference: {ref['seconds']:.0f} s per epoch of {ref['iterations']} it, {ref['gpu_gib']:.0f} GB",
        "",
        f"setting          samples/s  epoch of {ref['iterations']} it  peak GPU GiB  TFLOP/s    MFU  warm-up s  "
        f"loss after {r['warmup_steps'] + r['steps']}  fp32's",
    ]
    for row in r["settings"]:
        lines.append(
            f"{row['setting']:<16} {row['samples_per_s']:>9.2f}  {row['epoch_seconds']:>13.1f}s  "
            f"{row['peak_gpu_gib']:>12.2f}  {row['tflops_per_s']:>7.3g}  {100 * row['mfu']:>4.1f}%  "
            f"{row['warmup_seconds']:>9.1f}  {row['loss']:>13.4f}  {fp32:>6.4f}")
    return "\n".join(lines)

