"""Our training runs as the accuracy benchmarks (real_accuracy.py, train_accuracy.py) run them:
the experiment config, a run trained in a subprocess at a measured cost, and its test cases
predicted by `pipeline.predict` and scored with Dice on their original grids."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml

from benchmarks.processes import process_tree_cost, run_logged
from pipeline.common.metrics import dice
from pipeline.common.store import TaskStore


def accuracy_config(work: Path, name: str, stores: Sequence[Path | str], model: dict[str, Any], *, epochs: int,
                    iterations: int, batch_size: int, seed: int, experiment: str, workers: int = 1,
                    **train: Any) -> dict[str, Any]:
    """One run's experiment config: `epochs` x `iterations`, validated and checkpointed after the
    last epoch only, one data-loading process and one CPU per worker; Ray and MLflow (SQLite) under
    `work`, no model registered."""
    return {
        "name": name,
        "data": {"stores": [str(s) for s in stores]},
        "model": model,
        "train": {"epochs": epochs, "iterations_per_epoch": iterations, "batch_size": batch_size,
                  "validate_every": epochs, "checkpoint_every": epochs, "loader_workers": 1,
                  "log_every": 10_000, "seed": seed, **train},
        "ray": {"num_workers": workers, "cpus_per_worker": 1, "storage_path": str(work / "ray")},
        "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": experiment,
                   "registered_model": None},
    }


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


def train_and_score_ours(work: Path, config: dict[str, Any], raw: Path) -> dict[str, Any]:
    """Train one of our runs (in a subprocess), predict every task's test cases, score them."""
    from pipeline.train.run import RECORD_FILE

    path = work / "configs" / f"{config['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    with process_tree_cost() as cost:
        run_logged([sys.executable, "-m", "pipeline.train", "--config", path],
                   log_file=work / "logs" / f"{config['name']}.log")
    record = json.loads((Path(config["ray"]["storage_path"]) / config["name"] / RECORD_FILE).read_text())
    scores = {}
    for store in config["data"]["stores"]:
        task = Path(store).name.removesuffix(".zarr")
        out = work / "predictions" / config["name"] / task
        shutil.rmtree(out, ignore_errors=True)
        run_logged([sys.executable, "-m", "pipeline.predict", "--model", record["model_uri"], "--task", task,
                    "--tracking-uri", config["mlflow"]["tracking_uri"], "-i", raw / task / "imagesTs", "-o", out,
                    "--tta", "off"], log_file=work / "logs" / f"{config['name']}-predict-{task}.log")
        scores[task] = test_dice(out, raw / task, label_names(TaskStore.open(store).manifest.labels))
    return {"name": config["name"], "wall_s": cost.wall_s, "cpu_s": cost.cpu_s, "dice": scores}
