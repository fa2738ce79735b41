"""Training step throughput: full step (loader + model) on 1 and 2 Ray workers, loader alone, model alone.

Run by hand: `python -m benchmarks.train_step [--stores S.zarr ...] [--patch 32 64 64] [--steps 30]`.
Without `--stores`, the four default synthetic tasks are generated and ingested into a temporary
folder first. On a GPU: `python -m benchmarks.train_step --gpu --model-only --preset uniseg-paper`
times the model step alone (a random batch of one of the 11 reference tasks, no stores, no Ray) in
each step setting (`--settings`: fp32, fp16, bf16, bf16 + channels-last, bf16 + channels-last +
torch.compile), each from the same seed on the same batch: samples/s, the epoch time (550
iterations) beside the reference's 210 s, peak GPU memory beside its 10 GB, model FLOP
utilisation (the step's forward + backward FLOPs, counted once by torch's FlopCounterMode, per
second over the device's dense bf16 peak, `PEAK_BF16_TFLOPS` or `--peak-tflops`), and the loss
after all steps next to fp32's. On the CPU only fp32 runs (`--steps 3 --preset tiny` checks the
code). Printed (and written as JSON with `--out`):

- loader only: batches/s of the training BatchStream (store reads + nnU-Net augmentation, or with
  `--augment-on device` the reads alone, the transforms then running in the step) with
  0 and `--loader-workers` background workers, in this process;
- model only: forward + backward + optimizer step on a cached batch (no loading), this process;
- full step on N Ray workers (TorchTrainer, DDP on gloo or NCCL): samples/s summed over ranks,
  the fraction of the step spent waiting for data, peak memory per worker (RSS of the worker
  and, separately, its loader processes; CUDA peak on GPU); scaling efficiency =
  samples/s(N) / (N x samples/s(1)).

Every worker gets `--cpus-per-worker` CPUs and that many torch threads, as in training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import results
from benchmarks.step_settings import SETTINGS, model_only_report, model_only_synthetic, sync_device, timed_steps
from benchmarks.stores import synthetic_stores
from pipeline.common.config import ExperimentConfig, config_from_dict, to_dict
from pipeline.common.logs import setup_logging
from pipeline.train.data import augment_batch
from pipeline.train.step import train_step

log = logging.getLogger("benchmarks.train_step")


def make_config(args: argparse.Namespace, stores: list[str], workers: int, storage: str) -> ExperimentConfig:
    return config_from_dict({
        "name": f"train-step-{workers}",
        "data": {"stores": stores},
        "model": {"preset": args.preset, "architecture": args.architecture,
                  "patch_size": list(args.patch) if args.patch else None},
        "train": {"epochs": 1, "iterations_per_epoch": args.warmup + args.steps, "batch_size": args.batch_size,
                  "loader_workers": args.loader_workers, "precision": "auto", "augment_on": args.augment_on},
        "ray": {"num_workers": workers, "use_gpu": args.gpu, "cpus_per_worker": args.cpus_per_worker,
                "storage_path": storage},
    })


def peak_rss_mib() -> tuple[float, float]:
    """Peak resident memory (MiB) of this process and of its largest finished child."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def loader_only(cfg: ExperimentConfig, workers: int, batches: int) -> float:
    """Batches/s of the training loader with `workers` background processes."""
    from pipeline.train.loop import batch_loader, build_parts  # Ray; --model-only runs without it

    cfg = config_from_dict(to_dict(cfg) | {"train": to_dict(cfg)["train"] | {"loader_workers": workers,
                                                                             "iterations_per_epoch": batches + 2}})
    parts = build_parts(cfg, 0, torch.device("cpu"))
    iterator = iter(batch_loader(parts))
    next(iterator), next(iterator)  # start-up (worker fork, first reads)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - started)


def model_only(cfg: ExperimentConfig, steps: int, device: torch.device) -> float:
    """Training steps/s on one cached batch (no data loading)."""
    from pipeline.train.loop import batch_loader, build_parts  # Ray; --model-only runs without it

    parts = build_parts(cfg, 0, device)
    batch = next(iter(batch_loader(parts)))
    if cfg.train.augment_on == "device":
        batch = augment_batch(batch, device)
    return timed_steps(parts.network, batch, parts.optimizer, parts.scaler, device, parts.amp, steps,
                       parts.execution.memory_format)[0]


def bench_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: `warmup` steps, then `steps` timed full steps (loader + model)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from pipeline.train.loop import Parts, batch_loader, build_parts, wrap_model

    cfg = config_from_dict(config["experiment"])
    warmup, steps = config["warmup"], config["steps"]
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    context = ray.train.get_context()
    parts: Parts = build_parts(cfg, context.get_world_rank(), ray.train.torch.get_device())
    model = wrap_model(parts, 0)
    batches = iter(batch_loader(parts))
    waited = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync_device(parts.device)
            started, waited = time.perf_counter(), 0.0
        before = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - before
        if cfg.train.augment_on == "device":
            batch = augment_batch(batch, parts.device)
        train_step(model, batch, parts.optimizer, parts.scaler, parts.device, parts.amp, "dice_ce", 12.0,
                   parts.execution.memory_format)
    sync_device(parts.device)
    seconds = time.perf_counter() - started
    del batches  # ends the loader processes so their peak memory is counted
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if parts.device.type == "cuda" else 0.0
    rss, children = peak_rss_mib()
    mine = torch.tensor([steps * cfg.train.batch_size / seconds, waited / seconds, rss, children, cuda_peak],
                        dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(context.get_world_size())]
    if dist.is_initialized():
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    # Ray Train V2 keeps metrics only with a checkpoint: the figures travel as one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if context.get_world_rank() == 0:
            (Path(tmp) / "ranks.json").write_text(json.dumps([t.tolist() for t in everyone]))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({}, checkpoint=checkpoint)


def full_step(args: argparse.Namespace, stores: list[str], workers: int, storage: str) -> dict[str, float]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = make_config(args, stores, workers, storage)
    resources = {"CPU": args.cpus_per_worker} | ({"GPU": 1} if args.gpu else {})
    trainer = TorchTrainer(
        bench_worker,
        train_loop_config={"experiment": to_dict(cfg), "warmup": args.warmup, "steps": args.steps},
        torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=args.gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f"train-step-{workers}-{os.getpid()}-{time.time_ns()}", storage_path=storage),
    )
    with trainer.fit().checkpoint.as_directory() as folder:
        ranks = json.loads((Path(folder) / "ranks.json").read_text())
    return {
        "workers": workers,
        "samples_per_s": sum(r[0] for r in ranks),
        "data_wait": sum(r[1] for r in ranks) / len(ranks),
        "peak_rss_mib": max(r[2] for r in ranks),
        "peak_loader_rss_mib": max(r[3] for r in ranks),
        "peak_cuda_mib": max(r[4] for r in ranks),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stores", nargs="+", help="task stores (default: synthetic ones in a temporary folder)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--architecture", default="uniseg", choices=["uniseg", "multihead", "dodnet"])
    p.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"), help="default: the preset's")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--augment-on", choices=["loader", "device"], default="loader",
                   help="train.augment_on: transforms in the loader processes or on the worker's device")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--model-only", action="store_true",
                   help="time the model step alone on a random batch (no stores, no Ray) in each of --settings; "
                        "with --gpu, beside the reference's epoch time and memory")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                   help="step settings of --model-only (default: all on a GPU, fp32 on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="network seed of every --model-only setting")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, TFLOP/s (default: a table)")
    p.add_argument("--out", type=Path, help="results file (default: benchmarks/results/train_step/"
                                            "results.json, model_only.json with --model-only)")
    args = p.parse_args()
    setup_logging()
    run = results.start(seeds=[args.seed])
    out = args.out or results.RESULTS / "train_step" / ("model_only.json" if args.model_only else "results.json")
    if args.model_only:
        figures = model_only_synthetic(args, torch.device("cuda" if args.gpu else "cpu"))
        print(model_only_report(figures))
        results.write(out, run, figures)
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    from pipeline.train.loop import build_parts

    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        stores = args.stores or synthetic_stores(Path(tmp))
        cfg = make_config(args, stores, 1, str(Path(tmp) / "ray"))
        torch.set_num_threads(max(1, int(args.cpus_per_worker)))
        device = torch.device("cuda" if args.gpu else "cpu")
        patch = "x".join(map(str, build_parts(cfg, 0, torch.device("cpu")).spec.patch_size))
        figures: dict[str, Any] = {
            "preset": args.preset, "architecture": args.architecture, "patch": patch, "batch_size": args.batch_size,
            "augment_on": args.augment_on,
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.gpu else "cpu",
            "loader_only_samples_per_s": {
                str(w): loader_only(cfg, w, args.steps) * args.batch_size for w in sorted({0, args.loader_workers})
            },
            "model_only_samples_per_s": model_only(cfg, args.steps, device) * args.batch_size,
        }
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        figures["full_step"] = [full_step(args, stores, w, str(Path(tmp) / "ray")) for w in args.workers]
        ray.shutdown()
    base = figures["full_step"][0]["samples_per_s"] / figures["full_step"][0]["workers"]
    for row in figures["full_step"]:
        row["scaling_efficiency"] = row["samples_per_s"] / (row["workers"] * base)
    print(report(figures))
    results.write(out, run, figures)


def report(r: dict[str, Any]) -> str:
    lines = [
        f"{r['preset']} {r['architecture']}, patch {r['patch']}, batch {r['batch_size']} per worker, "
        f"{r['device']}, {r['cpus']} CPUs, load average {', '.join(f'{x:.1f}' for x in r['load_average'])}",
        "",
        "loader only (this process):  " + ", ".join(
            f"{w} loader workers {v:.1f} samples/s" for w, v in r["loader_only_samples_per_s"].items()),
        f"model only (cached batch):   {r['model_only_samples_per_s']:.1f} samples/s",
        "",
        "Ray workers  samples/s  per worker  data wait  efficiency  peak RSS MiB  loader RSS MiB  CUDA MiB",
    ]
    for row in r["full_step"]:
        lines.append(
            f"{row['workers']:>11}  {row['samples_per_s']:>9.1f}  {row['samples_per_s'] / row['workers']:>10.1f}  "
            f"{100 * row['data_wait']:>8.0f}%  {row['scaling_efficiency']:>10.2f}  {row['peak_rss_mib']:>12.0f}  "
            f"{row['peak_loader_rss_mib']:>14.0f}  {row['peak_cuda_mib']:>8.0f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
