"""A tiny trained UniSeg shared by the predict and evaluate tests (no tests here).

Two synthetic CT tasks (liver: 3 classes, anisotropic 1.5 x 1.5 x 5 mm; spleen: 2 classes) are
written in the MSD layout, ingested into Zarr stores with `pipeline.ingest`, and the tiny preset
is trained on their training cases for a few hundred seeded iterations with a plain torch loop
(not pipeline.train: these tests must not depend on it). A third, untrained 2-channel MR task
makes the model multi-modal. The model is logged to a SQLite MLflow store and registered as
`tiny-uniseg` with the alias `champion`; the same weights also sit in a local model folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from model.presets import PRESETS
from pipeline.common.config import IngestConfig
from pipeline.common.mlflow_model import log_model
from pipeline.common.model_card import ModelCard, TaskCard, build_from_card, save_model_dir
from pipeline.common.store import TaskStore
from pipeline.datasets.synthetic import DEFAULT_TASKS, write_task
from pipeline.ingest.run import run as ingest

LIVER = dataclasses.replace(DEFAULT_TASKS[0], num_cases=5, num_test_cases=1)
SPLEEN = dataclasses.replace(DEFAULT_TASKS[1], num_cases=3, num_test_cases=0)
PROSTATE = TaskCard("Task03_SynthProstate", {0: "background", 1: "peripheral zone", 2: "transition zone"},
                    ("T2", "ADC"), (3.6, 2.5, 2.5), ({"scheme": "zscore"},) * 2)
TARGET_SPACING = (5.0, 3.0, 3.0)  # (z, y, x) mm
PATCH = (16, 32, 32)
ITERATIONS = 240
MODEL_NAME = "tiny-uniseg"


@dataclass(frozen=True)
class World:
    raw: dict[str, Path]  # task name -> raw MSD folder
    stores: dict[str, str]  # task name -> Zarr store
    tracking_uri: str
    model_uri: str  # models:/tiny-uniseg@champion
    model_dir: Path  # the same model as a local folder (fast to load)
    card: ModelCard


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The world, built once per test session (import this fixture into a test module)."""
    return build_world(tmp_path_factory.getbasetemp() / "predict-world")


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Every test of a module that imports this fixture runs torch on one thread."""
    with one_thread():
        yield


@functools.cache
def build_world(root: Path) -> World:
    raw = {task.name: write_task(root / "raw", task) for task in (LIVER, SPLEEN)}
    config = IngestConfig(target_spacing=TARGET_SPACING, ct_normalization="uniseg-window",
                          folds=3, split_seed=8, scheduler="synchronous")  # validation: liver 002, 004; spleen 002
    report = ingest([str(p) for p in raw.values()], str(root / "stores"), config)
    assert report.ok, [d.summary() for d in report.datasets]
    stores = {d.source.split("/")[-1]: d.store for d in report.datasets}
    opened = [TaskStore.open(stores[name]) for name in raw]
    card = ModelCard(PRESETS["tiny"].replace(patch_size=PATCH),
                     tuple(TaskCard.from_manifest(s.manifest) for s in opened) + (PROSTATE,))
    network = train(card, opened)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    model_dir = save_model_dir(network, card, root / "model")
    _register(network, card, tracking_uri, root / "artifacts")
    return World(raw, stores, tracking_uri, f"models:/{MODEL_NAME}@champion", model_dir, card)


def train(card: ModelCard, stores: list[TaskStore]) -> torch.nn.Module:
    """Adam on Dice + cross-entropy, tasks alternating, half the patches forced to foreground."""
    with one_thread():
        return _train(card, stores)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread: on a busy 2-core machine, 2 OpenMP threads are 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(card: ModelCard, stores: list[TaskStore]) -> torch.nn.Module:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    network = build_from_card(card).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    for step in range(ITERATIONS):
        task_id = step % len(stores)
        patches = [stores[task_id].sample_patch(rng, PATCH, force_foreground=i == 0) for i in range(2)]
        image = torch.from_numpy(np.stack([p[0] for p in patches]))
        label = torch.from_numpy(np.stack([p[1] for p in patches])).long()
        logits = network(image, task_id)[0][:, : card.tasks[task_id].num_classes]
        loss = F.cross_entropy(logits, label) + _soft_dice_loss(logits, label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.eval()


def _soft_dice_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    probabilities = torch.softmax(logits, 1)[:, 1:]
    target = F.one_hot(label, logits.shape[1]).movedim(-1, 1)[:, 1:].float()
    overlap = (probabilities * target).sum((0, 2, 3, 4))
    total = probabilities.sum((0, 2, 3, 4)) + target.sum((0, 2, 3, 4))
    return 1 - ((2 * overlap + 1) / (total + 1)).mean()


def _register(network: torch.nn.Module, card: ModelCard, tracking_uri: str, artifacts: Path) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment("predict-tests", artifact_location=artifacts.as_uri())
    with mlflow.start_run(experiment_id=experiment):
        log_model(network, card, registered_model_name=MODEL_NAME)
    MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", 1)
