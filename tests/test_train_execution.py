"""How the step runs (pipeline/train/execution.py): the precision decision for every branch, the
resumed scaler across precisions, channels-last and compilation on the CPU, and which networks
need DDP's unused-parameter search, checked by 2-process gloo DDP runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_loop import one_thread  # noqa: F401  (autouse: one torch thread, as a training worker has)

from model.presets import build_network, preset_spec
from model.tasks import TaskSpec
from pipeline.common.config import FinetuneConfig, TrainConfig, config_from_dict
from pipeline.common.services import free_port
from pipeline.train import finetune
from pipeline.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.train.data import collate
from pipeline.train.execution import (
    BF16,
    FP16,
    FP32,
    compile_network,
    decide_precision,
    find_unused_parameters,
    freeze_unreached,
    memory_format,
    prepare_network,
    unreached_parameters,
)
from pipeline.train.loss import deep_supervision_loss
from pipeline.train.optim import build_optimizer
from pipeline.train.step import train_step

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a CUDA device object needs no GPU until used
PATCH = (8, 16, 16)
WORLD = 2


def _network(architecture: str = "uniseg", channels: tuple[int, ...] = (1, 1), seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = preset_spec("tiny", patch_size=PATCH, spacing=(1.0, 1.0, 1.0), architecture=architecture)
    return build_network(spec, [TaskSpec(f"t{i}", 2 + i, c) for i, c in enumerate(channels)])


def _batch(task: int, channels: int, classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two samples of one task, each label a box of every foreground class."""
    rng = np.random.default_rng(seed)
    labels = []
    for _ in range(2):
        label = np.zeros(PATCH, np.uint8)
        for c in range(1, classes):
            label[2 * c : 2 * c + 3, 2:12, 3 * c : 3 * c + 6] = c
        labels.append(label)
    images = [rng.normal(size=(channels, *PATCH)).astype(np.float32) + lab for lab in labels]
    return collate(images, labels, [task, task], [2 + t for t in range(task + 1)])


# Precision ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", ["auto", "bf16", "fp16", "fp32"])
def test_a_cpu_trains_in_float32_whatever_the_setting(setting: str) -> None:
    assert decide_precision(setting, CPU, bf16_native=True) == FP32
    assert decide_precision(setting, CPU) == FP32  # asks no GPU


@pytest.mark.parametrize(("setting", "native", "expected"), [
    ("auto", True, BF16), ("auto", False, FP16), ("bf16", True, BF16),
    ("fp16", True, FP16), ("fp16", False, FP16), ("fp32", True, FP32), ("fp32", False, FP32),
])
def test_precision_on_cuda(setting: str, native: bool, expected: object) -> None:
    assert decide_precision(setting, CUDA, bf16_native=native) == expected


def test_explicit_bf16_on_a_gpu_without_it_is_an_error() -> None:
    with pytest.raises(ValueError, match="train.precision: bf16: the GPU cuda has no native bfloat16.*auto or fp16"):
        decide_precision("bf16", CUDA, bf16_native=False)


def test_auto_asks_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.train.execution as execution

    monkeypatch.setattr(execution, "bf16_is_native", lambda device: False)
    assert decide_precision("auto", CUDA) == FP16
    monkeypatch.setattr(execution, "bf16_is_native", lambda device: True)
    assert decide_precision("auto", CUDA) == BF16


def test_only_fp16_scales_the_loss() -> None:
    assert (FP16.dtype, FP16.scaled, FP16.autocast) == (torch.float16, True, True)
    assert (BF16.dtype, BF16.scaled, BF16.autocast) == (torch.bfloat16, False, True)
    assert (FP32.dtype, FP32.scaled, FP32.autocast) == (None, False, False)
    assert FP16.scaler(CPU).is_enabled() and not BF16.scaler(CPU).is_enabled() and not FP32.scaler(CPU).is_enabled()


def test_the_step_autocasts_to_the_precision_dtype() -> None:
    """The dtype reaches autocast (checked with CPU autocast, which takes bfloat16; training on
    a CPU never asks for it): the convolutions run in bfloat16, the loss stays float32."""
    network = _network()
    dtypes: list[torch.dtype] = []
    first_conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d))
    first_conv.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    optimizer = build_optimizer(network.parameters(), TrainConfig())
    loss = train_step(network, _batch(0, 1, 2), optimizer, BF16.scaler(CPU), CPU, BF16, "dice_ce", 12.0)
    assert dtypes == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)
    train_step(network, _batch(0, 1, 2), optimizer, FP32.scaler(CPU), CPU, FP32, "dice_ce", 12.0)
    assert dtypes[-1] == torch.float32


def test_old_amp_key_reads_as_precision() -> None:
    assert config_from_dict({}).train.precision == "auto"  # amp: true was the default
    assert config_from_dict({"train": {"amp": False}}).train.precision == "fp32"
    assert config_from_dict({"train": {"amp": True}}).train.precision == "auto"
    assert config_from_dict({"train": {"precision": "bf16"}}).train.precision == "bf16"


def test_old_amp_key_problems_are_named(tmp_path: Path) -> None:
    from pipeline.common.config import ConfigError, load_config

    path = tmp_path / "old.yaml"
    path.write_text("train:\n  amp: true\n  precision: fp16\n")
    with pytest.raises(ConfigError, match=r"old.yaml: train.amp: is the older name of train.precision, which is set"):
        load_config(path)
    path.write_text("train:\n  amp: 'yes'\n")
    with pytest.raises(ConfigError, match=r"old.yaml: train.amp: must be true or false, got 'yes'"):
        load_config(path)
    path.write_text("train:\n  amp: true\n")  # an old file, a new override: the command line wins
    assert load_config(path, overrides=["train.precision=fp16"]).train.precision == "fp16"
    path.write_text("train:\n  precision: bf16\n")
    assert load_config(path, overrides=["train.amp=false"]).train.precision == "fp32"


@pytest.mark.parametrize(("saved", "resumed"), [(FP16, BF16), (FP16, FP32), (BF16, FP16), (FP32, FP16), (FP16, FP16)])
def test_checkpoints_resume_across_precisions(saved: object, resumed: object, tmp_path: Path) -> None:
    """A scaler state (fp16) resumed without a scaler (bf16, fp32) is ignored; none (bf16, fp32)
    resumed with fp16 starts a fresh scaler; fp16 to fp16 keeps its scale."""
    ray = pytest.importorskip("ray.train")
    from pipeline.train.loop import Parts, resume
    from pipeline.train.sampling import build_sampler

    def parts(precision) -> Parts:
        network = _network()
        sampler = build_sampler("balanced", [4, 4], batches=2, batch_size=2, mixed=False, temperature=1.0, seed=0,
                                rank=0)
        execution = replace(prepare_network(network, TrainConfig(), CPU, [1, 1], network.spec.strides),
                            precision=precision)
        return Parts(config_from_dict({}), [], network.spec, network, build_optimizer(network.parameters(),
                     TrainConfig()), precision.scaler(CPU), sampler, CPU, execution)

    before = parts(saved)
    if saved.scaled:
        before.scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
        before.scaler.update(1024.0)
    state = TrainState(epoch=0, optimizer=before.optimizer.state_dict(), scaler=before.scaler.state_dict(),
                       sampler=before.sampler.state_dict())
    state.capture_rng()
    save_checkpoint(tmp_path, before.network, _card(before.network), state)
    after = parts(resumed)
    resume(ray.Checkpoint.from_directory(str(tmp_path)), after)
    assert after.scaler.is_enabled() == resumed.scaled
    if resumed.scaled:
        assert after.scaler.get_scale() == (1024.0 if saved.scaled else 65536.0)


def _card(network: torch.nn.Module):
    from pipeline.common.model_card import ModelCard, TaskCard

    tasks = tuple(TaskCard(t.name, {c: f"class {c}" for c in range(t.num_classes)}, ("CT",) * t.in_channels,
                           (1.0, 1.0, 1.0), ({"scheme": "zscore"},) * t.in_channels) for t in network.tasks)
    return ModelCard(spec=network.spec, tasks=tasks)


# Channels-last and compilation -------------------------------------------------------------------

def test_channels_last_only_on_cuda_unless_forced() -> None:
    assert memory_format(True, CUDA) == torch.channels_last_3d
    assert memory_format(True, CPU) == torch.preserve_format
    assert memory_format(True, CPU, force=True) == torch.channels_last_3d
    assert memory_format(False, CUDA) == torch.preserve_format
    network = _network()
    execution = prepare_network(network, TrainConfig(channels_last=True), CPU, [1, 1], network.spec.strides)
    assert execution.memory_format == torch.preserve_format  # the CPU default is unchanged
    assert all(p.is_contiguous() for p in network.parameters())


@pytest.mark.parametrize("architecture", ["uniseg", "multihead", "dodnet"])
def test_channels_last_step_matches_contiguous(architecture: str, tmp_path: Path) -> None:
    """Forced on the CPU: the weights and the batch in channels-last 3D give the contiguous
    network's losses over 3 steps, and its checkpoint loads into a contiguous network."""
    losses = {}
    for layout in (torch.preserve_format, torch.channels_last_3d):
        network = _network(architecture)
        network.to(memory_format=layout)
        if layout == torch.channels_last_3d:
            conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d) and m.weight.shape[-1] > 1)
            assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        optimizer = build_optimizer(network.parameters(), TrainConfig())
        losses[layout] = [train_step(network, _batch(i % 2, 1, 2 + i % 2, seed=i), optimizer, FP32.scaler(CPU), CPU,
                                     FP32, "dice_ce", 12.0, layout).item() for i in range(3)]
    np.testing.assert_allclose(losses[torch.channels_last_3d], losses[torch.preserve_format], rtol=1e-4)
    save_checkpoint(tmp_path, network, _card(network), TrainState())
    fresh = _network(architecture, seed=1)
    load_checkpoint(tmp_path, fresh)
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, network.state_dict()[name])


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_network_trains_and_checkpoints_its_own_keys(backend: str, tmp_path: Path) -> None:
    """Compiled in place, the network keeps its class and state_dict keys (no `_orig_mod.`): its
    steps give the eager network's losses and its checkpoint loads strictly into an uncompiled one."""
    eager, compiled = _network(), _network()
    keys = list(eager.state_dict())
    assert compile_network(compiled, backend=backend) is compiled and type(compiled) is type(eager)
    losses = []
    for network in (eager, compiled):
        optimizer = build_optimizer(network.parameters(), TrainConfig())
        losses.append([train_step(network, _batch(0, 1, 2, seed=i), optimizer, FP32.scaler(CPU), CPU, FP32,
                                  "dice_ce", 12.0).item() for i in range(2)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    assert list(compiled.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    save_checkpoint(tmp_path, compiled, _card(compiled), TrainState())
    fresh = _network(seed=1)
    load_checkpoint(tmp_path, fresh)  # strict
    torch.testing.assert_close(fresh.state_dict(), compiled.state_dict())


# Parameters without a gradient and DDP -----------------------------------------------------------

def _real_unreached(network: torch.nn.Module, task: int, channels: int, classes: int) -> set[str]:
    """Trainable parameters left without a gradient by the real loss on a single-task batch."""
    network.zero_grad(set_to_none=True)
    batch = _batch(task, channels, classes)
    outputs = network(batch["image"], batch["task"])
    deep_supervision_loss(outputs, batch["label"], batch["num_classes"], batch["task"]).backward()
    return {n for n, p in network.named_parameters() if p.requires_grad and p.grad is None}


@pytest.mark.parametrize(("architecture", "channels", "never", "search"), [
    ("uniseg", (1, 1), {"heads.convs.1.weight"}, False),
    ("dodnet", (1, 1), {"pre_head.1.conv.weight", "pre_head.1.conv.bias", "pre_head.1.norm_act.0.weight",
                        "pre_head.1.norm_act.0.bias"}, False),
    ("multihead", (1, 1), {"heads.0.convs.1.weight", "heads.1.convs.1.weight"}, True),
    ("uniseg", (1, 2), {"heads.convs.1.weight"}, True),  # one stem per channel count
    ("uniseg", (1, 2, 1, 2), {"heads.convs.1.weight"}, True),  # one probe per channel count, for every task
    ("multihead", (1, 1, 1), {"heads.0.convs.1.weight", "heads.1.convs.1.weight", "heads.2.convs.1.weight"}, True),
])
def test_unreached_parameters_match_the_loss(architecture: str, channels: tuple[int, ...], never: set[str],
                                             search: bool) -> None:
    """The probe's answer is what the real loss leaves without a gradient; what no task reaches
    (the zero-weighted lowest deep-supervision level) is frozen; the rest decides the search."""
    network = _network(architecture, channels)
    unreached = unreached_parameters(network, channels, network.spec.strides)
    for task, c in enumerate(channels):
        assert unreached[task] == _real_unreached(network, task, c, 2 + task)
    assert set(freeze_unreached(network, unreached)) == never
    assert not any(p.requires_grad for n, p in network.named_parameters() if n in never)
    assert find_unused_parameters(network, unreached) is search
    for task, c in enumerate(channels):
        assert _real_unreached(network, task, c, 2 + task) == unreached[task] - never


@pytest.mark.parametrize(("architecture", "passes"), [("uniseg", 2), ("dodnet", 2), ("multihead", 5)])
def test_the_probe_runs_once_per_parameter_set(architecture: str, passes: int) -> None:
    """Tasks of one channel count reach the same UniSeg or DoDNet parameters: one pass each, not
    one per task (200 tasks cost 200 passes at start-up); a multihead network's tasks differ."""
    network = _network(architecture, (1, 1, 2, 1, 2))
    calls = []
    network.register_forward_hook(lambda *_: calls.append(1))
    unreached_parameters(network, (1, 1, 2, 1, 2), network.spec.strides)
    assert len(calls) == passes


def test_a_frozen_encoder_needs_no_search() -> None:
    """Stems per channel count need the search while they train; frozen (fine-tuning's first
    epochs), DDP ignores them, and so does the decision."""
    network = _network("uniseg", (1, 2))
    unreached = unreached_parameters(network, (1, 2), network.spec.strides)
    freeze_unreached(network, unreached)
    assert find_unused_parameters(network, unreached)
    for name, p in network.named_parameters():
        if name.startswith("encoder."):
            p.requires_grad_(False)
    assert not find_unused_parameters(network, unreached)


def test_probe_leaves_no_trace() -> None:
    """The probe draws no random numbers and leaves mode and weights as they were."""
    network = _network().eval()
    state = {k: v.clone() for k, v in network.state_dict().items()}
    rng = torch.get_rng_state()
    unreached_parameters(network, (1, 1), network.spec.strides)
    assert torch.equal(torch.get_rng_state(), rng) and not network.training
    assert all(p.grad is None for p in network.parameters())
    torch.testing.assert_close(network.state_dict(), state)


# Each DDP case: (architecture, task channels, compile backend, frozen encoder); its expected flag.
DDP_CASES = {
    "uniseg": (("uniseg", (1, 1), None, False), False),
    "dodnet": (("dodnet", (1, 1), None, False), False),
    "multihead": (("multihead", (1, 1), None, False), True),
    "uniseg, 1- and 2-channel tasks": (("uniseg", (1, 2), None, False), True),
    "fine-tuning, encoder frozen": (("plain", (1,), None, True), False),
    "fine-tuning, encoder thawed": (("plain", (1,), None, False), False),
    "uniseg, compiled": (("uniseg", (1, 1), "aot_eager", False), False),
    "multihead, compiled": (("multihead", (1, 1), "aot_eager", False), True),  # the search through a compiled graph
}


def _ddp_case(rank: int, architecture: str, channels: tuple[int, ...], backend: str | None, frozen_encoder: bool,
              prepare: bool) -> tuple[bool, str, float]:
    """Build the case's network as training does, wrap it in DDP with the decided flag and run
    3 steps of single-task batches (tasks in turn); (flag, outcome, weight checksum)."""
    from torch.nn.parallel import DistributedDataParallel

    network = _network(architecture, channels)
    unreached = unreached_parameters(network, channels, network.spec.strides)
    if prepare:
        freeze_unreached(network, unreached)
    if frozen_encoder:
        finetune.freeze_encoder(network, FinetuneConfig(pretrained="x", freeze_encoder_epochs=1), 0)
    if backend:
        compile_network(network, backend=backend)
    flag = find_unused_parameters(network, unreached) if prepare else False
    model = DistributedDataParallel(network, find_unused_parameters=flag)
    optimizer = build_optimizer(network.parameters(), TrainConfig())
    try:
        for step in range(3):
            task = step % len(channels)
            train_step(model, _batch(task, channels[task], 2 + task, seed=10 * rank + step), optimizer,
                       FP32.scaler(CPU), CPU, FP32, "dice_ce", 12.0)
        outcome = "ok"
    except RuntimeError as err:
        outcome = str(err).splitlines()[0]
    return flag, outcome, sum(p.detach().double().sum().item() for p in network.parameters())


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {name: _ddp_case(rank, *case, prepare=True) for name, (case, _) in DDP_CASES.items()}
        # The control, last (it leaves DDP's reducer waiting): today's UniSeg, nothing frozen,
        # without the search, fails as DDP says it does.
        results["control"] = _ddp_case(rank, "uniseg", (1, 1), None, False, prepare=False)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_runs_with_the_decided_flag(tmp_path: Path) -> None:
    """2 gloo ranks, each architecture (and fine-tuning's frozen and thawed encoder, compiled
    networks with and without the search): the decided flag is the expected one and 3 steps of single-task batches
    complete, the ranks ending with the same weights. The control (UniSeg as it was built
    before, without the search) hits DDP's unfinished-reduction error, so the runs can see it.
    1-2 minutes on 2 busy cores (process start, the compiled cases)."""
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, (_, expected) in DDP_CASES.items():
        (flag, outcome, checksum), (_, other_outcome, other_checksum) = ranks[0][name], ranks[1][name]
        assert (flag, outcome, other_outcome) == (expected, "ok", "ok"), name
        assert checksum == pytest.approx(other_checksum, rel=1e-9), name
    assert "Expected to have finished reduction in the prior iteration" in ranks[0]["control"][1]
