"""The CUDA path: training steps in float16 and bfloat16, channels-last and compiled, the sliding
window on the GPU, and a DDP step over NCCL between two GPUs. Marked `gpu` and skipped without CUDA: run `pytest -m gpu` on a GPU
machine (README, "GPU")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_inference import PointwiseNet
from test_train_loop import PATCH, TASKS, _mixed_batch

from model.presets import build_network, preset_spec
from pipeline.common.config import TrainConfig
from pipeline.common.inference import InferenceOptions, predict_probabilities
from pipeline.train.execution import BF16, FP16, FP32, bf16_is_native, decide_precision, find_unused_parameters, \
    prepare_network
from pipeline.train.optim import build_optimizer
from pipeline.train.step import train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def _tiny_network(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network(preset_spec("tiny", patch_size=PATCH), TASKS)


def test_training_steps_with_amp_on_cuda() -> None:
    """Two AMP steps: the convolutions run in float16, the loss is finite, every trainable weight
    moves, the scaler keeps a finite scale; the first loss matches float32's on the same weights."""
    network = _tiny_network().to(CUDA)
    reference = _tiny_network().to(CUDA)
    batch = {k: v.pin_memory() for k, v in _mixed_batch().items()}
    dtypes: list[torch.dtype] = []
    first_conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d))
    first_conv.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    optimizer = build_optimizer(network.parameters(), TrainConfig())
    scaler = FP16.scaler(CUDA)

    losses = [train_step(network, batch, optimizer, scaler, CUDA, FP16, "dice_ce", 12.0) for _ in range(2)]
    fp32_loss = train_step(reference, batch, build_optimizer(reference.parameters(), TrainConfig()),
                           FP32.scaler(CUDA), CUDA, FP32, "dice_ce", 12.0)

    assert dtypes and set(dtypes) == {torch.float16}
    assert all(loss.device.type == CUDA.type and torch.isfinite(loss) for loss in losses)
    assert losses[0].item() == pytest.approx(fp32_loss.item(), rel=2e-2)
    assert 0 < scaler.get_scale() < float("inf")
    unchanged = [n for n, p in network.named_parameters()
                 if p.requires_grad and p.grad is not None and torch.equal(p.detach(), before[n])]
    assert not unchanged, f"weights that did not move: {unchanged[:5]}"


@pytest.mark.skipif(not torch.cuda.is_available() or not bf16_is_native(CUDA), reason="needs native bfloat16")
def test_bf16_steps_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` on this GPU is bf16: the convolutions run in bfloat16 without loss scaling, every
    trainable weight moves, the first loss is within 3 % of float32's (TF32 off) on the same weights."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert decide_precision("auto", CUDA) == BF16
    network, reference = _tiny_network().to(CUDA), _tiny_network().to(CUDA)
    batch = _mixed_batch()
    dtypes: list[torch.dtype] = []
    first_conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d))
    first_conv.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    scaler = BF16.scaler(CUDA)
    optimizer = build_optimizer(network.parameters(), TrainConfig())
    losses = [train_step(network, batch, optimizer, scaler, CUDA, BF16, "dice_ce", 12.0) for _ in range(2)]
    fp32_loss = train_step(reference, batch, build_optimizer(reference.parameters(), TrainConfig()),
                           FP32.scaler(CUDA), CUDA, FP32, "dice_ce", 12.0)
    assert set(dtypes) == {torch.bfloat16} and not scaler.is_enabled()
    assert all(torch.isfinite(loss) for loss in losses)
    assert losses[0].item() == pytest.approx(fp32_loss.item(), rel=3e-2)
    unchanged = [n for n, p in network.named_parameters()
                 if p.grad is not None and torch.equal(p.detach(), before[n])]
    assert not unchanged, f"weights that did not move: {unchanged[:5]}"


@pytest.mark.parametrize("compiled", [False, True])
def test_channels_last_and_compiled_steps_on_cuda(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set up as training sets it up on CUDA (`prepare_network`): channels-last weights (and
    compiled by inductor), 3 float32 steps (TF32 off) give the plain network's losses; the
    state_dict keys stay the plain network's."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    channels = [t.in_channels for t in TASKS]
    losses = []
    for train in (TrainConfig(precision="fp32"), TrainConfig(precision="fp32", channels_last=True, compile=compiled)):
        network = _tiny_network().to(CUDA)
        keys = list(network.state_dict())
        execution = prepare_network(network, train, CUDA, channels, network.spec.strides)
        optimizer = build_optimizer(network.parameters(), train)
        losses.append([train_step(network, _mixed_batch(seed=i), optimizer, FP32.scaler(CUDA), CUDA, FP32, "dice_ce",
                                  12.0, execution.memory_format).item() for i in range(3)])
        assert list(network.state_dict()) == keys
    assert execution.memory_format == torch.channels_last_3d
    conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)


@pytest.mark.parametrize("mirror_axes", [(), (0, 1, 2)])
def test_sliding_window_on_cuda_known_answer(mirror_axes: tuple[int, ...]) -> None:
    """The pointwise network's known answer, with the windows on the GPU and the stitched
    probabilities on the CPU (the default) or on the GPU."""
    image = torch.randn(3, 21, 37, 30, generator=torch.Generator().manual_seed(0))
    expected = torch.softmax(image + torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1, 1), dim=0)
    options = InferenceOptions(mirror_axes=mirror_axes, amp=False)
    for output_device in ("cpu", "cuda"):
        probabilities = predict_probabilities(PointwiseNet().to(CUDA), image, 0, 3, (8, 16, 16), options,
                                              output_device=output_device)
        assert probabilities.device.type == output_device
        torch.testing.assert_close(probabilities.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_sliding_window_of_a_network_on_cuda_matches_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny UniSeg over a volume larger than its patch: GPU (float32 and AMP) agree with the CPU.
    TF32 convolutions (cuDNN's default on Ampere and later) differ from float32 by ~1e-3, so
    the float32 comparison turns them off."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    network = _tiny_network().eval()
    image = torch.randn(4, 24, 50, 41, generator=torch.Generator().manual_seed(1))
    on_cpu = predict_probabilities(network, image, 2, 4, PATCH, InferenceOptions(amp=False))
    on_gpu = predict_probabilities(network.to(CUDA), image, 2, 4, PATCH, InferenceOptions(amp=False))
    with_amp = predict_probabilities(network, image, 2, 4, PATCH, InferenceOptions(amp=True))
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)
    assert (with_amp - on_cpu).abs().max() < 2e-2
    assert (with_amp.argmax(0) == on_cpu.argmax(0)).float().mean() > 0.99


def _ddp_step_worker(config: dict) -> None:
    """Ray Train worker: one DDP step on its own GPU (the training set-up: `auto` precision, the
    decided unused-parameter search), each rank with its own batch; rank 0 reports every rank's
    loss, device and checksum of the weights after the step."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    network = _tiny_network().to(device)
    execution = prepare_network(network, TrainConfig(), device, [t.in_channels for t in TASKS], network.spec.strides)
    unused = find_unused_parameters(network, execution.unreached)
    network = ray.train.torch.prepare_model(network, parallel_strategy_kwargs={"find_unused_parameters": unused})
    optimizer = build_optimizer(network.parameters(), TrainConfig())
    scaler = execution.precision.scaler(device)
    loss = train_step(network, _mixed_batch(seed=rank), optimizer, scaler, device, execution.precision, "dice_ce", 12.0)
    mine = (dist.get_backend(), str(device), loss.item(), sum(p.detach().double().sum().item() for p in network.parameters()))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    ray.train.report({"ranks": everyone})


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_worker_nccl_step(tmp_path) -> None:
    """Two Ray Train workers, one GPU each, NCCL: different batches, different losses, and after
    the step both hold the same weights (DDP averaged the gradients). NCCL on the loopback interface,
    as a local Ray's training sets it up."""
    ray = pytest.importorskip("ray")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.process_group import LoopbackTorchConfig

    ray.init(num_gpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        trainer = TorchTrainer(_ddp_step_worker, torch_config=LoopbackTorchConfig(backend="nccl"),
                               scaling_config=ScalingConfig(num_workers=2, use_gpu=True),
                               run_config=RunConfig(storage_path=str(tmp_path)))
        ranks = trainer.fit().metrics["ranks"]
    finally:
        ray.shutdown()
    backends, devices, losses, checksums = zip(*ranks)
    assert set(backends) == {"nccl"} and len(set(devices)) == 2
    assert losses[0] != losses[1] and np.isfinite(losses).all()
    assert checksums[0] == pytest.approx(checksums[1], rel=1e-12)
