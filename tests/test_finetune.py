"""Fine-tuning: parameter depths, layer-wise decay, freezing and warm-up (unit); and on CPU, a
registered tiny universal model transferred to a new task, trained and registered (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

from model.presets import build_network, preset_spec
from model.tasks import TaskSpec
from model.unet import PlainUNet
from model.universal import add_tasks
from pipeline.common.config import FinetuneConfig, TrainConfig, load_config
from pipeline.common.mlflow_model import load_model
from pipeline.datasets.synthetic import SyntheticTask, write_task
from pipeline.finetune.__main__ import main
from pipeline.train.checkpoint import STATE_FILE
from pipeline.train.finetune import (
    apply_schedule,
    build_finetune_optimizer,
    freeze_encoder,
    freeze_old_elements,
    keep_old_elements,
    layer_ids,
    warmup_factor,
)
from pipeline.train.optim import build_optimizer
from pipeline.train.run import run as train_run

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = (
    SyntheticTask("Task01_FtLiver", ("CT",), ("background", "liver", "tumour"), spacing=(1.5, 1.5, 4.0),
                  shape=(32, 32, 16), num_cases=4),
    SyntheticTask("Task02_FtProstate", ("T2",), ("background", "prostate"), spacing=(1.0, 1.0, 3.0),
                  shape=(32, 32, 16), num_cases=4),
)
NEW = SyntheticTask("Task05_FtSpleen", ("CT",), ("background", "spleen"), spacing=(1.5, 1.5, 4.0),
                    shape=(32, 32, 16), num_cases=4)


def _plain() -> PlainUNet:
    return PlainUNet(preset_spec("tiny", patch_size=(16, 32, 32), spacing=(4.0, 1.5, 1.5), architecture="plain"), 1, 2)


def test_layer_ids_run_from_stem_to_heads() -> None:
    names = [n for n, _ in _plain().named_parameters()]
    ids = layer_ids(names)
    stem = ids["encoder.stems.1.weight"]
    heads = max(ids[n] for n in names if n.startswith("heads."))
    assert stem == 0 and heads == max(ids.values())
    assert ids[next(n for n in names if n.startswith("encoder.stages.0."))] == 1
    deepest_decoder = next(n for n in names if n.startswith("decoder.upsample.0"))
    last_encoder = max(ids[n] for n in names if n.startswith("encoder."))
    assert ids[deepest_decoder] == last_encoder + 1


def test_decay_freeze_and_warmup() -> None:
    network = _plain()
    finetune = FinetuneConfig(pretrained="x", freeze_encoder_epochs=1, warmup_epochs=2, layer_decay=0.5)
    optimizer = build_finetune_optimizer(network, TrainConfig(learning_rate=0.1), finetune)
    scales = [g["lr_scale"] for g in optimizer.param_groups]
    assert scales[-1] == 1.0 and scales == sorted(scales) and scales[0] == 0.5 ** (len(scales) - 1)
    assert [warmup_factor(finetune, e) for e in range(3)] == [1 / 3, 2 / 3, 1.0]

    apply_schedule(optimizer, finetune, 0, 0.1)  # frozen and warming up
    assert all(g["lr"] == 0 for g in optimizer.param_groups if g["encoder"])
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.1 / 3)
    assert freeze_encoder(network, finetune, 0) and not freeze_encoder(network, finetune, 0)  # changed once
    assert not any(p.requires_grad for n, p in network.named_parameters() if n.startswith("encoder."))
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    network(torch.randn(1, 1, 16, 32, 32))[0].sum().backward()
    optimizer.step()
    assert all(torch.equal(before[n], p) for n, p in network.named_parameters() if n.startswith("encoder."))

    apply_schedule(optimizer, finetune, 2, 0.1)  # unfrozen, warm
    assert freeze_encoder(network, finetune, 1) and all(p.requires_grad for p in network.parameters())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * scales[0])
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.1)


def _old_slices_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(after[n][tuple(slice(0, k) for k in w.shape)], w) for n, w in before.items())


def test_an_added_task_leaves_the_old_tasks_alone() -> None:
    """A 2-channel task with 4 classes added to a UniSeg of 1- and 2-class tasks (1 channel): a
    new stem, prompt slot, FUSE maps and head outputs; the old tasks' outputs unchanged; trained
    with weight decay and momentum, only the new elements move, and the new task learns."""
    torch.manual_seed(0)
    spec = preset_spec("tiny", patch_size=(8, 16, 16), spacing=(1.0, 1.0, 1.0), architecture="uniseg")
    source = build_network(spec, [TaskSpec("a", 3, 1), TaskSpec("b", 2, 1)]).eval()
    grown, new = add_tasks(source, [TaskSpec("c", 4, 2)])
    assert [t.name for t in grown.tasks] == ["a", "b", "c"] and grown.max_classes == 4
    assert new["encoder.stems.2.weight"].all() and not new["fuse.0.conv.weight"].any()
    assert new["prompt"][0, 2 * spec.prompt_channels:].all() and not new["prompt"][0, :2 * spec.prompt_channels].any()
    x = torch.randn(2, 1, 8, 16, 16)
    before = [source(x, t)[0][:, :source.tasks[t].num_classes] for t in (0, 1)]
    grown.eval()
    for t in (0, 1):
        torch.testing.assert_close(grown(x, t)[0][:, :source.tasks[t].num_classes], before[t], rtol=0, atol=1e-6)

    grown.train()
    freeze_old_elements(grown, new)
    optimizer = build_optimizer(grown.parameters(), TrainConfig(learning_rate=0.1, weight_decay=0.1))
    keep_old_elements(optimizer, grown, new)
    image, label = torch.randn(2, 2, 8, 16, 16), torch.randint(0, 4, (2, 8, 16, 16))
    start = {n: p.detach().clone() for n, p in grown.named_parameters()}
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(grown(image, 2)[0], label)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert _old_slices_equal(source.state_dict(), grown.state_dict())
    assert not torch.equal(start["fuse.2.conv.weight"], grown.fuse[2].conv.weight)
    assert losses[-1] < losses[0]
    grown.eval()
    for t in (0, 1):
        torch.testing.assert_close(grown(x, t)[0][:, :source.tasks[t].num_classes], before[t], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("finetune_data")
    command = [sys.executable, "-m", "pipeline.ingest", "--out", str(root / "stores"), "--num-workers", "1"]
    for task in (*UPSTREAM, NEW):
        command += ["--source", str(write_task(root / "raw", task))]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return {"upstream": [str(root / "stores" / f"{t.name}.zarr") for t in UPSTREAM],
            "new": [str(root / "stores" / f"{NEW.name}.zarr")]}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if ray.is_initialized():  # left by another module
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_config(tmp: Path, stores: list[str], name: str, **train: object) -> Path:
    raw = {
        "name": name,
        "data": {"stores": stores},
        "model": {"preset": "tiny", "patch_size": [16, 32, 32]},
        "train": {"epochs": 2, "iterations_per_epoch": 3, "batch_size": 2, "validate_every": 1,
                  "checkpoint_every": 1, "loader_workers": 0, "precision": "fp32", **train},
        "ray": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(tmp / "ray")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "finetune-tests",
                   "registered_model": "ft-universal"},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def checkpoint_after(run_dir: Path, epochs_trained: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights and the optimizer state of the run's checkpoint written after `epochs_trained` epochs."""
    for folder in sorted(run_dir.glob("checkpoint_*")):
        network, card = load_model(str(folder))
        if card.metadata["epochs_trained"] == epochs_trained:
            return network.state_dict(), torch.load(folder / STATE_FILE, weights_only=True)["optimizer"]
    raise AssertionError(f"{run_dir}: no checkpoint after {epochs_trained} epochs")


@pytest.mark.slow
def test_finetune_from_registered_model(stores: dict[str, list[str]], tmp_path: Path, local_ray: None) -> None:
    """A universal model (1 worker) fine-tuned on a new task by 2 DDP workers: the encoder frozen
    for the first of 2 epochs stays bit-identical in that epoch's checkpoint, and gathers no
    momentum there (frozen, not trained at lr 0), then trains."""
    cfg = load_config(write_config(tmp_path, stores["upstream"], "universal"))
    universal = train_run(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    client.set_registered_model_alias("ft-universal", "champion", "1")
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    source, pretrained = load_model("models:/ft-universal@champion")

    config = write_config(tmp_path, stores["upstream"], "recipe")
    code = main(["--pretrained", "models:/ft-universal@champion", "--store", stores["new"][0], "--config", str(config),
                 "--name", "spleen", "--register", "ft-spleen", "--set", "finetune.freeze_encoder_epochs=1",
                 "--set", "finetune.layer_decay=0.8", "--set", "finetune.warmup_epochs=1",
                 "--set", "ray.num_workers=2"])
    assert code == 0
    tuned, card = load_model("models:/ft-spleen/1")
    assert card.spec.architecture == "plain" and [t.name for t in card.tasks] == [NEW.name]
    assert card.metadata["pretrained"] == "models:/ft-universal/1"
    source_state, tuned_state = source.state_dict(), tuned.state_dict()
    frozen_state, frozen_optimizer = checkpoint_after(tmp_path / "ray" / "spleen", 1)
    encoder = [n for n in tuned_state if n.startswith("encoder.") and n in source_state]
    assert encoder and all(torch.equal(frozen_state[n], source_state[n]) for n in encoder), "frozen encoder changed"
    encoder_ids = {i for group in frozen_optimizer["param_groups"] if group["encoder"] for i in group["params"]}
    assert encoder_ids and frozen_optimizer["state"], frozen_optimizer["param_groups"]
    assert not encoder_ids & set(frozen_optimizer["state"]), "the frozen encoder gathered optimizer state"
    assert any(not torch.equal(tuned_state[n], source_state[n]) for n in encoder), "thawed encoder did not train"
    decoder = [n for n in tuned_state if n.startswith("decoder.stages.") and n.endswith("weight")]
    assert any(not torch.equal(frozen_state[n], source_state[n]) for n in decoder), "decoder did not train"
    run = client.search_runs([client.get_experiment_by_name("finetune-tests").experiment_id],
                             "attributes.run_name = 'spleen'")[0]
    assert "dice/mean" in run.data.metrics and run.data.params["finetune.pretrained"] == "models:/ft-universal/1"
    assert universal.model_uri == "models:/ft-universal/1"


def test_add_task_refuses_a_non_uniseg_model_and_a_known_task(stores: dict[str, list[str]], tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Checked before training starts: one line per problem, exit status 2."""
    from pipeline.common.model_card import ModelCard, TaskCard, save_model_dir
    from pipeline.common.store import TaskStore

    manifests = [TaskStore.open(uri).manifest for uri in stores["upstream"]]
    spec = preset_spec("tiny", patch_size=(16, 32, 32), spacing=(4.0, 1.5, 1.5), architecture="multihead")
    network = build_network(spec, [TaskSpec(m.task_name, m.num_classes, m.in_channels) for m in manifests])
    folder = save_model_dir(network, ModelCard(spec, tuple(TaskCard.from_manifest(m) for m in manifests)),
                            tmp_path / "multihead")
    code = main(["--pretrained", str(folder), "--store", stores["upstream"][0], "--add-task",
                 "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == 2
    assert f"{folder}: adding a task needs a UniSeg model, this one is multihead" in caplog.text
    assert f"{folder} already has task {UPSTREAM[0].name}" in caplog.text


@pytest.mark.slow
def test_add_a_task_to_a_registered_model(stores: dict[str, list[str]], tmp_path: Path, local_ray: None) -> None:
    """One command adds a task to a registered universal model (2 DDP workers): a new version of
    that model lists 3 tasks, keeps every old weight bit for bit and predicts the old tasks as
    before; the new task is validated and predicted."""
    from pipeline.common.inference import InferenceOptions, label_map, predict_probabilities
    from pipeline.common.store import TaskStore

    cfg = load_config(write_config(tmp_path, stores["upstream"], "universal"))
    train_run(cfg)
    MlflowClient(cfg.mlflow.tracking_uri).set_registered_model_alias("ft-universal", "champion", "1")
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    source, pretrained = load_model("models:/ft-universal@champion")

    config = write_config(tmp_path, stores["upstream"], "recipe")
    code = main(["--pretrained", "models:/ft-universal@champion", "--store", stores["new"][0], "--config", str(config),
                 "--add-task", "--name", "add-spleen", "--set", "ray.num_workers=2"])
    assert code == 0
    grown, card = load_model("models:/ft-universal/2")
    assert [t.name for t in card.tasks] == [*(t.name for t in UPSTREAM), NEW.name]
    assert card.spec.architecture == "uniseg" and card.metadata["add_task"] is True
    assert card.metadata["pretrained"] == "models:/ft-universal/1"
    for task in UPSTREAM:  # evaluation leaves out the cases the old tasks trained on, as it did for the source
        assert card.cases_trained_on(task.name) == pretrained.cases_trained_on(task.name) != frozenset()
    assert card.cases_trained_on(NEW.name) == frozenset(TaskStore.open(stores["new"][0]).manifest.split["train"])
    assert _old_slices_equal(source.state_dict(), grown.state_dict())
    options = InferenceOptions()
    for task, uri in enumerate([*stores["upstream"], *stores["new"]]):
        store = TaskStore.open(uri)
        image, _ = store.read_case(store.case_ids("validation")[0])
        image = torch.as_tensor(image)
        predicted = label_map(predict_probabilities(grown, image, task, card.tasks[task].num_classes,
                                                    card.spec.patch_size, options))
        assert predicted.shape == image.shape[1:] and int(predicted.max()) < card.tasks[task].num_classes
        if task < len(UPSTREAM):
            expected = label_map(predict_probabilities(source, image, task, card.tasks[task].num_classes,
                                                       card.spec.patch_size, options))
            assert torch.equal(predicted, expected), f"task {task} predicts otherwise"
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("finetune-tests").experiment_id],
                             "attributes.run_name = 'add-spleen'")[0]
    assert any(NEW.name.lower() in key.lower() for key in run.data.metrics if key.startswith("dice/")), run.data.metrics
