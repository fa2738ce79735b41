"""Loop helpers without Ray: a mixed-task training step, the schedule, checkpoints, the model card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.presets import build_network
from model.tasks import TaskSpec
from pipeline.common.config import ModelConfig, TrainConfig, config_from_dict
from pipeline.common.intensity import ChannelNormalization
from pipeline.common.model_card import load_model_dir
from pipeline.common.store import StoreManifest
from pipeline.train.build import model_card, network_spec
from pipeline.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.train.data import collate
from pipeline.train.execution import FP32
from pipeline.train.optim import build_optimizer, set_learning_rate
from pipeline.train.step import train_step

TASKS = [TaskSpec("ct", 3, 1), TaskSpec("mr", 2, 2), TaskSpec("brain", 4, 4)]
PATCH = (16, 32, 32)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as each training worker has; more only thrash on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _manifest(name: str, channels: int, classes: int, spacing: tuple[float, float, float]) -> StoreManifest:
    return StoreManifest(
        task_name=name, modalities=tuple(f"MR{i}" for i in range(channels)),
        labels={0: "background", **{c: f"class {c}" for c in range(1, classes)}}, target_spacing=spacing,
        normalization=tuple(ChannelNormalization("zscore") for _ in range(channels)), cases={},
        split={"train": [], "validation": []},
    )


def _mixed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """One sample per task (1, 2 and 4 channels), each label a box per foreground class."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for task in TASKS:
        label = np.zeros(PATCH, np.uint8)
        for c in range(1, task.num_classes):
            label[2 * c : 2 * c + 6, 4:20, 4 * c : 4 * c + 8] = c
        images.append(rng.normal(size=(task.in_channels, *PATCH)).astype(np.float32) + label)
        labels.append(label)
    return collate(images, labels, [0, 1, 2], [t.num_classes for t in TASKS])


@pytest.mark.parametrize("architecture", ["uniseg", "multihead", "dodnet"])
def test_mixed_task_batch_trains(architecture: str) -> None:
    """One batch spanning three tasks (1, 2 and 4 channels): the loss falls when fitting it."""
    torch.manual_seed(0)
    spec = network_spec(ModelConfig(preset="tiny", architecture=architecture, patch_size=PATCH),
                        [_manifest("x", 1, 2, (1.0, 1.0, 1.0))])
    network = build_network(spec, TASKS)
    train = TrainConfig(epochs=10)
    optimizer = build_optimizer(network.parameters(), train)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = _mixed_batch()
    losses = [train_step(network, batch, optimizer, scaler, torch.device("cpu"), FP32, "dice_ce", 12.0).item()
              for _ in range(8)]
    assert all(np.isfinite(losses))
    assert min(losses[-3:]) < losses[0]


def test_poly_schedule() -> None:
    train = TrainConfig(epochs=10, learning_rate=0.01)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], train)
    assert set_learning_rate(optimizer, train, 0) == pytest.approx(0.01)
    assert set_learning_rate(optimizer, train, 5) == pytest.approx(0.01 * 0.5**0.9)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**0.9)
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.99
    constant = TrainConfig(epochs=10, lr_schedule="constant")
    assert set_learning_rate(optimizer, constant, 9) == pytest.approx(constant.learning_rate)


def test_network_spec_replans_for_a_new_patch_with_the_median_spacing() -> None:
    manifests = [_manifest("a", 1, 2, (5.0, 1.5, 1.5)), _manifest("b", 1, 2, (3.0, 1.0, 1.0)),
                 _manifest("c", 1, 2, (4.0, 1.2, 1.2))]
    spec = network_spec(ModelConfig(preset="tiny", patch_size=(16, 64, 64)), manifests)
    assert spec.patch_size == (16, 64, 64)
    assert spec.strides[1] == (1, 2, 2)  # z (4 mm) is coarser than 2 x y/x (1.2 mm): not pooled first
    assert network_spec(ModelConfig(preset="tiny"), manifests).patch_size == (32, 64, 64)  # the preset's own


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    cfg = config_from_dict({"name": "ckpt", "model": {"preset": "tiny", "patch_size": list(PATCH)}})
    manifests = [_manifest("ct", 1, 3, (2.0, 1.0, 1.0)), _manifest("mr", 2, 2, (3.0, 1.0, 1.0))]
    spec = network_spec(cfg.model, manifests)
    network = build_network(spec, [TaskSpec("ct", 3, 1), TaskSpec("mr", 2, 2)])
    optimizer = build_optimizer(network.parameters(), cfg.train)
    state = TrainState(epoch=7, optimizer=optimizer.state_dict(), sampler={"epoch": 7, "position": 0},
                       history=[{"epoch": 0.0, "train/loss": 1.5}], torch_rng=torch.get_rng_state())
    card = model_card(cfg, spec, manifests, epoch=7)
    save_checkpoint(tmp_path, network, card, state)

    fresh = build_network(spec, [TaskSpec("ct", 3, 1), TaskSpec("mr", 2, 2)])
    restored = load_checkpoint(tmp_path, fresh)
    assert restored.epoch == 7 and restored.history == state.history and restored.sampler["epoch"] == 7
    for a, b in zip(network.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b)
    # The checkpoint is also a model folder: everything predict needs is in its card.
    _, loaded = load_model_dir(tmp_path)
    assert loaded.spec == spec and [t.name for t in loaded.tasks] == ["ct", "mr"]
    assert loaded.tasks[1].modalities == ("MR0", "MR1") and loaded.tasks[0].target_spacing == (2.0, 1.0, 1.0)
    assert loaded.tasks[0].normalization[0]["scheme"] == "zscore"
    assert loaded.metadata["epochs_trained"] == 7 and loaded.metadata["patch_size"] == list(PATCH)
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "missing", fresh)


@pytest.mark.parametrize("tasks", [2, 200])
def test_dice_plot_fits_any_number_of_tasks(tasks: int, tmp_path: Path) -> None:
    """Up to MAX_NAMED_TASKS tasks the legend names them; 200 tasks' names would not fit (matplotlib
    warned that it could not lay the figure out), so their lines go unnamed around the mean."""
    import warnings

    import matplotlib.pyplot as plt

    from pipeline.train import mlflow_run

    history = [{"epoch": float(e), "train/loss": 1.0 - e / 10, "dice/mean": 0.5,
                **{f"dice/Task{i:03d}/mean": i / tasks for i in range(tasks)}} for e in range(2)]
    legends = []
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("error")
        close = plt.close
        patch.setattr(plt, "close", lambda fig: (legends.append(fig.axes[0].get_legend()), close(fig)))
        written = mlflow_run.write_plots(history, tmp_path)
    assert [p.name for p in written] == ["loss.png", "dice.png"] and all(p.stat().st_size for p in written)
    names = [t.get_text() for t in legends[-1].get_texts()]
    assert names == ([f"Task{i:03d}" for i in range(tasks)] if tasks <= mlflow_run.MAX_NAMED_TASKS else []) + \
        ["mean over tasks"]
