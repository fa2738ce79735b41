"""MLflow for training: the run (driver), per-epoch metrics (Ray Train controller), plots
(rank 0), the final model.

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
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import ray.train
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.common.config import ExperimentConfig, flatten, save_config
from pipeline.common.tracking import ensure_experiment
from pipeline.common.trials import param_value

log = logging.getLogger(__name__)

History = list[dict[str, float]]
MAX_NAMED_TASKS = 12  # dice.png names each task's line up to this many tasks; more are drawn grey, unnamed


def start_run(cfg: ExperimentConfig, tracking_uri: str, run_id: str | None = None) -> str:
    """Create the run of a training job (or reopen `run_id` on resume); returns its id."""
    mlflow.set_tracking_uri(tracking_uri)
    if run_id is not None:
        with mlflow.start_run(run_id=run_id):
            _log_config(cfg, "config/resumed.yaml")
        return run_id
    experiment_id = ensure_experiment(cfg.mlflow.experiment, tracking_uri)
    with mlflow.start_run(run_name=cfg.name, experiment_id=experiment_id) as run:
        mlflow.log_params({k: param_value(v) for k, v in flatten(cfg).items()})
        mlflow.set_tag("stage", "train")
        _log_config(cfg, "config/config.yaml")
        return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Mark the run FINISHED, FAILED or KILLED."""
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def _log_config(cfg: ExperimentConfig, artifact: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact).name
        save_config(cfg, path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact).parent))


def log_epoch_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], epoch: int) -> None:
    timestamp = int(time.time() * 1000)
    batch = [Metric(key, float(value), timestamp, epoch) for key, value in metrics.items()]
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start : start + 1000])


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
        log_epoch_metrics(MlflowClient(self.tracking_uri), self.run_id, merge_rank_metrics(metrics),
                          int(metrics[0]["epoch"]))


class EpochLogger:
    """Rank 0's handle on the run: the loss/Dice plots."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_plots(self, history: History) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_plots(history, Path(tmp)):
                self.client.log_artifact(self.run_id, str(path), artifact_path="plots")


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


def log_final_model(tracking_uri: str, run_id: str, model_dir: str | Path, registered_name: str | None) -> str:
    """Log the model folder of the last checkpoint to the run (and register it); returns its URI."""
    from pipeline.common.mlflow_model import log_model
    from pipeline.common.model_card import load_model_dir

    mlflow.set_tracking_uri(tracking_uri)
    network, card = load_model_dir(model_dir)
    with mlflow.start_run(run_id=run_id):
        info = log_model(network, card, registered_model_name=registered_name)
    version = getattr(info, "registered_model_version", None)
    return f"models:/{registered_name}/{version}" if registered_name and version else info.model_uri

