"""Accuracy on the synthetic multi-task set: UniSeg vs multi-head, DoDNet-style and single-task nets.

Run by hand: `python benchmarks/train_accuracy.py [--work DIR] [--cases 10] [--epochs 15]
[--iterations 40] [--patch 32 64 64]`. Generates the four default synthetic tasks with
`--cases` labelled cases each (ingest keeps 20 % for validation), then trains, through
`pipeline.train.run` on a local Ray with `--workers` workers:

- the three universal networks (uniseg, multihead, dodnet) on all four tasks;
- one single-task network per task (a one-task multi-head net: a plain nnU-Net U-Net).

Every model runs the same number of iterations (epochs x iterations x batch), so a universal
model spreads them over four tasks where each single-task model spends them on one. Reported:
validation Dice per task (mean over its foreground classes) and the mean over tasks, from
sliding-window inference on the validation cases after the last epoch; per-class values go to
the JSON (`--out`) and to MLflow (`<work>/mlflow.db`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.common.config import config_from_dict
from pipeline.common.logs import setup_logging
from pipeline.train.run import run

log = logging.getLogger("benchmarks.train_accuracy")
UNIVERSAL = ("uniseg", "multihead", "dodnet")


def synthetic_stores(work: Path, cases: int) -> list[str]:
    from pipeline.datasets.synthetic import DEFAULT_TASKS, write_collection

    stores = [work / "stores" / f"{t.name}.zarr" for t in DEFAULT_TASKS]
    if all(s.exists() for s in stores):
        return [str(s) for s in stores]
    tasks = [dataclasses.replace(t, num_cases=cases) for t in DEFAULT_TASKS]
    sources = write_collection(work / "raw", tasks)
    command = [sys.executable, "-m", "pipeline.ingest", "--out", str(work / "stores")]
    for source in sources:
        command += ["--source", str(source)]
    subprocess.run(command, check=True, capture_output=True)
    return [str(s) for s in stores]


def train(args: argparse.Namespace, name: str, architecture: str, stores: list[str]) -> dict[str, Any]:
    cfg = config_from_dict({
        "name": name,
        "data": {"stores": stores},
        "model": {"preset": "tiny", "architecture": architecture, "patch_size": list(args.patch),
                  "prompt_channels": args.prompt_channels},
        "train": {"epochs": args.epochs, "iterations_per_epoch": args.iterations, "batch_size": args.batch_size,
                  "validate_every": args.epochs, "checkpoint_every": args.epochs, "loader_workers": 1,
                  "log_every": 10_000, "seed": args.seed},
        "ray": {"num_workers": args.workers, "cpus_per_worker": 1, "storage_path": str(args.work / "ray")},
        "mlflow": {"tracking_uri": f"sqlite:///{args.work / 'mlflow.db'}", "experiment": "train-accuracy",
                   "registered_model": None},
    })
    started = time.perf_counter()
    result = run(cfg)
    seconds = time.perf_counter() - started
    dice = {k: v for k, v in result.metrics.items() if k.startswith("dice/")}
    log.info("%s: mean Dice %.3f in %.0f s", name, dice.get("dice/mean", float("nan")), seconds)
    return {"name": name, "architecture": architecture, "seconds": seconds, "dice": dice,
            "final_loss": result.metrics.get("train/loss")}


def table(results: list[dict[str, Any]], tasks: list[str], args: argparse.Namespace) -> str:
    short = [t.split("_", 1)[-1].removeprefix("Synth") for t in tasks]
    iterations = args.epochs * args.iterations
    lines = [
        f"tiny preset, patch {'x'.join(map(str, args.patch))}, batch {args.batch_size} x {args.workers} worker(s), "
        f"{iterations} iterations per model, validation Dice after the last epoch",
        "",
        "| model | " + " | ".join(short) + " | mean | train min |",
        "|---|" + "---:|" * (len(tasks) + 2),
    ]
    for r in (r for r in results if r["task"] is None):
        cells = [r["dice"].get(f"dice/{t}/mean", float("nan")) for t in tasks]
        label = r["architecture"] + (f" ({args.prompt_channels} prompt ch)" if r["architecture"] == "uniseg"
                                     and args.prompt_channels != 1 else "")
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells)
                     + f" | {r['dice']['dice/mean']:.3f} | {r['seconds'] / 60:.1f} |")
    singles = {r["task"]: r for r in results if r["task"] is not None}
    if singles:
        cells = [singles[t]["dice"].get(f"dice/{t}/mean", float("nan")) if t in singles else float("nan") for t in tasks]
        minutes = sum(r["seconds"] for r in singles.values()) / 60
        lines.append("| single-task (one net per task) | " + " | ".join(f"{c:.3f}" for c in cells)
                     + f" | {sum(cells) / len(cells):.3f} | {minutes:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("outputs/train_accuracy"))
    p.add_argument("--cases", type=int, default=10, help="labelled cases per synthetic task")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--iterations", type=int, default=40, help="iterations per epoch")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--patch", type=int, nargs=3, default=[32, 64, 64])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-channels", type=int, default=1, help="UniSeg prompt maps per task (paper: 1)")
    p.add_argument("--models", nargs="+", default=[*UNIVERSAL, "single"])
    p.add_argument("--out", type=Path, help="JSON with every figure (default: <work>/results.json)")
    args = p.parse_args()
    setup_logging()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    stores = synthetic_stores(args.work, args.cases)
    tasks = [Path(s).name.removesuffix(".zarr") for s in stores]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    for model in args.models:
        if model == "single":
            for task, store in zip(tasks, stores):
                results.append(train(args, f"single-{task}-{stamp}", "multihead", [store]) | {"task": task})
        else:
            results.append(train(args, f"{model}-{stamp}", model, stores) | {"task": None})
    text = table(results, tasks, args)
    print(text)
    (args.out or args.work / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                    "results": results, "table": text}, indent=2))


if __name__ == "__main__":
    main()
