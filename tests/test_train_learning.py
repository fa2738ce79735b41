"""A learning check, not a timing check: single-task training on a small synthetic task must reach
a Dice floor within a fixed budget.

It runs the product's data path (TaskStore, BatchStream with nnU-Net's sampling and augmentation),
network, loss, optimizer and poly schedule in one process, without Ray, so a change that slows
learning (a misaligned augmentation, a broken oversampling rule, an init or loss change) fails
here instead of in a benchmark nobody re-ran. The floor was set from the code of issue 26's fix
(see FLOOR); the budget is small, so the floor sits well below a converged Dice. The same store
also takes `train.augment_on: device` through the loop's own epoch function.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from model.presets import build_network
from pipeline.common.config import IngestConfig, config_from_dict
from pipeline.common.store import TaskStore
from pipeline.datasets.synthetic import SyntheticTask, write_task
from pipeline.ingest.run import run as ingest
from pipeline.train.build import network_spec, task_specs
from pipeline.train.data import BatchStream
from pipeline.train.execution import FP32
from pipeline.train.loop import RunContext, batch_loader, build_parts, train_epoch
from pipeline.train.optim import build_optimizer, set_learning_rate
from pipeline.train.sampling import build_sampler
from pipeline.train.step import train_step
from pipeline.train.validation import ValidationTask, validate

TASK = SyntheticTask("Task09_LearnSpleen", ("CT",), ("background", "spleen"), spacing=(2.0, 2.0, 3.0),
                     shape=(48, 48, 32), num_cases=6)
PATCH = (16, 32, 32)
EPOCHS, ITERATIONS = 2, 10  # the steep part of the curve: 60 iterations reach 0.90-0.91, 20 reach 0.86-0.88
SEEDS = (0, 1)
# Validation Dice after EPOCHS x ITERATIONS (2 cases) on the code of issue 26: seeds 0-3 gave 0.881,
# 0.873, 0.874, 0.864 (seeds 0 and 1: mean 0.877). With the image mirrored but not its label (a
# misaligned augmentation) seeds 0 and 1 gave 0.798 and 0.758 (mean 0.778), below the floor. With
# the torch transforms of issue 20 (same distributions, a new random stream): 0.881, 0.869, 0.874, 0.860.
FLOOR = 0.84


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> TaskStore:
    root = tmp_path_factory.mktemp("learn")
    raw = write_task(root / "raw", TASK, layout="nnunetv2")
    report = ingest([raw], str(root / "stores"), IngestConfig(scheduler="synchronous"))
    assert report.ok, report
    return TaskStore.open(str(root / "stores" / f"{TASK.name}.zarr"))


def train_and_validate(store: TaskStore, seed: int) -> float:
    """Validation Dice of a single-task UniSeg (tiny preset at PATCH) after EPOCHS x ITERATIONS."""
    torch.manual_seed(seed)
    cfg = config_from_dict({
        "name": "learn", "data": {"stores": [store.uri]}, "model": {"preset": "tiny", "patch_size": list(PATCH)},
        "train": {"epochs": EPOCHS, "iterations_per_epoch": ITERATIONS, "seed": seed, "precision": "fp32"}})
    manifest = store.manifest
    spec = network_spec(cfg.model, [manifest])
    network = build_network(spec, task_specs([manifest]))
    optimizer = build_optimizer(network.parameters(), cfg.train)
    sampler = build_sampler("balanced", [len(store.case_ids("train"))], batches=ITERATIONS, batch_size=2,
                            mixed=False, temperature=1.0, seed=seed, rank=0)
    batches = iter(BatchStream(sampler, [store.uri], [manifest.num_classes], spec.patch_size, EPOCHS))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for epoch in range(EPOCHS):
        set_learning_rate(optimizer, cfg.train, epoch)
        network.train()
        for _ in range(ITERATIONS):
            train_step(network, next(batches), optimizer, scaler, torch.device("cpu"), FP32, "dice_ce", 12.0)
    network.eval()
    task = ValidationTask(0, manifest.task_name, manifest.labels, tuple(store.case_ids("validation")))
    return validate(network, [task], lambda _, case: store.read_case(case), spec.patch_size)["dice/mean"]


def test_single_task_learning_reaches_its_floor(store: TaskStore) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dice = [train_and_validate(store, seed) for seed in SEEDS]
    finally:
        torch.set_num_threads(before)
    assert np.all(np.isfinite(dice)) and np.mean(dice) >= FLOOR, f"validation Dice {dice} (mean < floor {FLOOR})"


def test_device_augmentation_runs_through_the_loop(store: TaskStore) -> None:
    """`train.augment_on: device` on the CPU: the loop's loader ships raw regions and draws, the
    loop augments them on the worker's device before each step (build_parts, batch_loader and
    train_epoch, as a Ray worker runs them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = config_from_dict({
            "name": "device-augment", "data": {"stores": [store.uri]},
            "model": {"preset": "tiny", "patch_size": list(PATCH)},
            "train": {"epochs": 1, "iterations_per_epoch": 2, "precision": "fp32", "loader_workers": 0,
                      "augment_on": "device"}})
        parts = build_parts(cfg, 0, torch.device("cpu"))
        stats = train_epoch(parts.network, iter(batch_loader(parts)), parts, 0, RunContext(), rank=0)
    finally:
        torch.set_num_threads(before)
    assert np.isfinite(stats.loss) and stats.iterations == 2 and stats.task_samples.tolist() == [4]
    assert (parts.sampler.epoch, parts.sampler.position) == (1, 0)  # the epoch consumed
