"""The whole training job on a GPU, as a user runs it: store, Ray Train, loader, predict.

Run by hand on a CUDA machine with the project's dependencies importable (benchmarks/gpu_checks.sh
installs them from carried wheels first):

    python -m benchmarks.gpu_job [--cases 4] [--scale 4] [--iterations 250]
        [--augment-on loader device] [--loader-workers N] [--out benchmarks/results/gpu_job/results.json]

1. data: one synthetic CT task (Task01_SynthLiver, liver and tumour) with `--cases` cases at
   `--scale` times its grid (4: 256 x 256 x 128 voxels), ingested into a Zarr store;
2. train: `pipeline.train.run` with the `--preset` (uniseg-paper: patch 64 x 192 x 192), one Ray
   worker holding the GPU and every CPU, `--loader-workers` loader processes, 2 epochs of
   `--iterations` / 2, once per `--augment-on` value (the loader's CPUs, or the GPU); the
   second epoch's figures (after cuDNN's autotuning): seconds per iteration, samples/s, the
   fraction of the step spent waiting for data, peak GPU memory; beside them the epoch time
   of 550 iterations and the reference's 210 s;
3. predict: `python -m pipeline.predict` of one full-size scan with the trained model, TTA off
   and on: seconds per scan (the process, model loading included) and the label map's shape.

With `--cpu` (no GPU; a check of the script itself) it runs the same on the CPU: use a small
`--scale`, `--preset tiny` and few iterations.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import results
from benchmarks.ingest import write_dataset
from pipeline.common.config import config_from_dict
from pipeline.common.logs import setup_logging

log = logging.getLogger("benchmarks.gpu_job")
TASK = "Task01_SynthLiver"
REFERENCE_EPOCH = {"iterations": 550, "seconds": 210.0}


def ingest(dataset: Path, work: Path) -> tuple[str, float]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.ingest", "--source", str(dataset), "--out", str(work / "stores")],
                   check=True)
    return str(work / "stores" / f"{dataset.name}.zarr"), time.perf_counter() - started


def train_config(args: argparse.Namespace, store: str, work: Path, augment_on: str) -> dict[str, Any]:
    cpus = os.cpu_count() or 2
    return {
        "name": f"gpu-job-{augment_on}",
        "data": {"stores": [store]},
        "model": {"preset": args.preset},
        "train": {"epochs": 2, "iterations_per_epoch": args.iterations // 2, "validate_every": 2,
                  "checkpoint_every": 2, "loader_workers": args.loader_workers or max(1, cpus - 2),
                  "log_every": 25, **({"augment_on": augment_on} if augment_on != "loader" else {})},
        "ray": {"num_workers": 1, "use_gpu": not args.cpu, "cpus_per_worker": cpus,
                "storage_path": str(work / "ray")},
        "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "gpu-job",
                   "registered_model": None},
    }


def epoch_figures(tracking_uri: str, run_id: str, iterations: int) -> dict[str, float]:
    """The last epoch's step figures from the run's MLflow metrics."""
    from pipeline.common.tracking import TrackedRun

    last = TrackedRun(tracking_uri, run_id).latest_metrics()
    seconds_per_iteration = 1.0 / last["train/iterations_per_s"]
    return {
        "seconds_per_iteration": seconds_per_iteration,
        "samples_per_s": last["train/samples_per_s"],
        "data_wait_fraction": last["train/data_wait_fraction"],
        "gpu_memory_gib": last.get("rank0/gpu_memory_gib", float("nan")),
        "epoch_of_550_s": 550 * seconds_per_iteration,
        "iterations": iterations,
    }


def train(args: argparse.Namespace, store: str, work: Path, augment_on: str) -> dict[str, Any]:
    from pipeline.train.run import run

    raw = train_config(args, store, work, augment_on)
    started = time.perf_counter()
    result = run(config_from_dict(raw))
    figures = epoch_figures(raw["mlflow"]["tracking_uri"], result.mlflow_run_id or "", args.iterations)
    figures |= {"augment_on": augment_on, "wall_s": time.perf_counter() - started,
                "loader_workers": raw["train"]["loader_workers"], "model_uri": result.model_uri}
    log.info("augment_on %s: %s", augment_on, figures)
    return figures


def predict(args: argparse.Namespace, model_uri: str, dataset: Path, work: Path, tta: str) -> dict[str, Any]:
    image = sorted((dataset / "imagesTr").glob("*.nii.gz"))[0]
    out = work / f"predictions-tta-{tta}"
    command = [sys.executable, "-m", "pipeline.predict", "--model", model_uri, "--task", dataset.name,
               "-i", str(image), "-o", str(out), "--tta", tta, "--device", "cpu" if args.cpu else "cuda"]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    seconds = time.perf_counter() - started
    import nibabel as nib

    shape = list(nib.load(next(out.glob("*.nii.gz"))).shape)
    return {"tta": tta, "seconds": seconds, "scan": image.name, "label_shape": shape}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--scale", type=float, default=4.0)
    p.add_argument("--preset", default="uniseg-paper")
    p.add_argument("--iterations", type=int, default=250, help="training iterations per run (2 epochs)")
    p.add_argument("--augment-on", nargs="+", default=["loader", "device"], choices=["loader", "device"])
    p.add_argument("--loader-workers", type=int, help="loader processes (default: CPUs - 2)")
    p.add_argument("--cpu", action="store_true", help="no GPU: check the script on the CPU")
    p.add_argument("--work", type=Path, help="keep data, runs and predictions here (default: temporary)")
    p.add_argument("--out", type=Path, default=results.RESULTS / "gpu_job" / "results.json", help="results file")
    args = p.parse_args()
    setup_logging()
    run = results.start(seeds=[0])  # the configs' train.seed default
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-job-"))
    dataset = write_dataset(work / "raw", TASK, args.cases, args.scale)
    store, ingest_s = ingest(dataset, work)
    runs = [train(args, store, work, mode) for mode in args.augment_on]
    model_uri = runs[-1]["model_uri"]
    predictions = [predict(args, model_uri, dataset, work, tta) for tta in ("off", "on")] if model_uri else []
    results.write(args.out, run, {"preset": args.preset, "ingest_s": ingest_s, "reference_epoch": REFERENCE_EPOCH,
                                  "train": runs, "predict": predictions})
    for r in runs:
        print(f"augment_on {r['augment_on']:6s} {r['samples_per_s']:6.1f} samples/s, data wait "
              f"{100 * r['data_wait_fraction']:4.1f} %, epoch of 550 it {r['epoch_of_550_s']:6.1f} s "
              f"(reference {REFERENCE_EPOCH['seconds']:.0f} s), GPU {r['gpu_memory_gib']:.1f} GiB")
    for r in predictions:
        print(f"predict TTA {r['tta']:3s} {r['seconds']:6.1f} s per scan ({r['label_shape']})")


if __name__ == "__main__":
    main()
