"""Training's MLflow run: the run (driver), per-epoch metrics (Ray Train controller), plots
(rank 0), the final model; logged through pipeline/common's `TrackedRun` and `mlflow_model`.

The driver creates or reopens the run and logs the config. Epoch metrics are logged by
`EpochMetricsCallback` on the Ray Train controller once every worker's report of the epoch has
arrived, so an epoch that a lost worker never finished is never logged (it is rerun after the
restart and logged then). Rank 0 logs the PNG plots into the run by id; after training the
driver logs and registers the model from the last checkpoint, which is itself a model folder
(weights + card).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray.train

from pipeline.common.config import ExperimentConfig, flatten, save_config
from pipeline.common.tracking import TrackedRun

log = logging.getLogger(__name__)

History = list[dict[str, float]]
MAX_NAMED_TASKS = 12  # dice.png names each task's line up to this many tasks; more are drawn grey, unnamed


def start_run(cfg: ExperimentConfig, tracking_uri: str, run_id: str | None = None) -> TrackedRun:
    """Create the run of a training job, or reopen `run_id` on resume."""
    if run_id is not None:
        run = TrackedRun(tracking_uri, run_id)
        run.reopen()
        _log_config(run, cfg, "config/resumed.yaml")
        return run
    run = TrackedRun.create(tracking_uri, cfg.mlflow.experiment, cfg.name, tags={"stage": "train"}, params=flatten(cfg))
    _log_config(run, cfg, "config/config.yaml")
    return run


def _log_config(run: TrackedRun, cfg: ExperimentConfig, artifact: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact).name
        save_config(cfg, path)
        run.log_file(path, str(Path(artifact).parent))


def merge_rank_metrics(reports: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One epoch's metrics from every worker's report: rank 0's all-ranks metrics, and each rank's
    own `rank/<name>` as `rank<r>/<name>`."""
    merged = {k: float(v) for k, v in reports[0].items() if not k.startswith("rank/") and k != "epoch"}
    for rank, report in enumerate(reports):
        merged |= {f"rank{rank}/{k.removeprefix('rank/')}": float(v) for k, v in report.items() if k.startswith("rank/")}
    return merged


class EpochMetricsCallback(ray.train.UserCallback):
    """Runs on the Ray Train controller: logs each epoch once all workers have reported it."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        TrackedRun(self.tracking_uri, self.run_id).log_metrics(merge_rank_metrics(metrics), int(metrics[0]["epoch"]))


class EpochLogger:
    """Rank 0's handle on the run: the loss/Dice plots."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.run = TrackedRun(tracking_uri, run_id)

    def log_plots(self, history: History) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_plots(history, Path(tmp)):
                self.run.log_file(path, "plots")


def write_plots(history: History, folder: Path) -> list[Path]:
    """loss.png (train loss per epoch) and dice.png (mean Dice per task per validation; with more
    than MAX_NAMED_TASKS tasks, their lines grey and unnamed around the black mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train/loss"] for h in history], label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("Dice + CE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)
    plt.close(fig)
    written.append(folder / "loss.png")
    keys = sorted({k for h in history for k in h if k.startswith("dice/") and k.endswith("/mean")})
    keys = [k for k in keys if k != "dice/mean"] + (["dice/mean"] if any("dice/mean" in h for h in history) else [])
    if keys:
        named = len(keys) <= MAX_NAMED_TASKS + 1  # beyond that, a legend of task names fills the figure
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            points = [(h["epoch"], h[key]) for h in history if key in h]
            if key == "dice/mean":
                ax.plot(*zip(*points), marker="o", label="mean over tasks", linewidth=2.5, color="black")
            elif named:
                ax.plot(*zip(*points), marker="o", label=key.split("/")[1], linewidth=1.2)
            else:
                ax.plot(*zip(*points), linewidth=0.6, color="grey", alpha=0.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation Dice")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "dice.png", dpi=100)
        plt.close(fig)
        written.append(folder / "dice.png")
    return written


def log_final_model(run: TrackedRun, model_dir: str | Path, registered_name: str | None) -> str:
    """Log the model folder of the last checkpoint to the run (and register it); returns its URI."""
    from pipeline.common.mlflow_model import log_model_to_run
    from pipeline.common.model_card import load_model_dir

    network, card = load_model_dir(model_dir)
    return log_model_to_run(run, network, card, registered_name)
