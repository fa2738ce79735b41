"""How the training step runs on its device: precision, memory layout, compilation, and what DDP
must be told about parameters without a gradient. Each is decided once per worker, by one
function, from `train.*` and the device.

- Precision (`decide_precision`, `train.precision`), on a CUDA device: `bf16` autocasts to
  bfloat16 and needs no loss scaling (bfloat16 has float32's exponent range); `fp16` autocasts
  to float16 with a GradScaler; `fp32` does not autocast. `auto` takes bf16 where the GPU
  computes it natively (compute capability 8.0 and later: A100, L4, H100, H200), fp16 on older
  GPUs; an explicit `bf16` on such a GPU is an error rather than a slow emulation. Any other
  device trains in float32 whatever the setting, as CPU training always has.
- Memory layout (`memory_format`, `train.channels_last`): channels-last 3D (N, Z, Y, X, C in
  memory) for the network's weights and each input batch, where cuDNN's convolutions run
  fastest with mixed precision; applied on CUDA only, unless forced (tests).
- Compilation (`compile_network`, `train.compile`): the network is compiled in place
  (`nn.Module.compile`) before DDP wraps it, as torch's guide advises for DDP ("Where to apply
  torch.compile?"). The module keeps its class and parameter names, so checkpoints hold the
  same state_dict keys as without it (no `_orig_mod.` prefix).
- Parameters without a gradient (`unreached_parameters`, `freeze_unreached`,
  `find_unused_parameters`). DDP waits, every step, for a gradient of every parameter that
  requires one; one that gets none fails the next step ("Expected to have finished reduction in
  the prior iteration") unless DDP was built with `find_unused_parameters=True`, which costs a
  walk of the autograd graph every step. `unreached_parameters` asks the network itself: one
  single-task batch per task, on the smallest grid the network takes, through the loss's
  deep-supervision weights (a level weighted 0 is left out of the loss, as `loss.py` does),
  and lists the trainable parameters that got no gradient. A mixed-task batch reaches the union
  of its tasks' parameters, so it leaves nothing unreached that every single-task batch reaches.
  What no task reaches never trains (the heads of the lowest deep-supervision level, weight 0):
  `freeze_unreached` turns its gradient off, which changes no number (the optimizer already
  skipped a parameter whose gradient stayed None) but stops DDP waiting for it. What some tasks
  leave unreached needs the search: a multihead network's other heads, and the input stems of
  a universal network whose tasks differ in channel count (one stem per count). UniSeg and
  DoDNet on tasks of one channel count and a fine-tuned single-task U-Net need no search; a
  frozen encoder does not count (DDP ignores parameters that do not require a gradient).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.common.config import TrainConfig
from pipeline.common.model_card import unwrap
from pipeline.train.loss import deep_supervision_weights

log = logging.getLogger(__name__)

PrecisionSetting = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass(frozen=True)
class Precision:
    """The step's mixed precision: autocast dtype (None: float32, no autocast) and loss scaling."""

    name: Literal["bf16", "fp16", "fp32"]
    dtype: torch.dtype | None
    scaled: bool

    @property
    def autocast(self) -> bool:
        return self.dtype is not None

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A GradScaler, enabled only for fp16 (a disabled one passes the loss and steps through)."""
        return torch.amp.GradScaler(device.type, enabled=self.scaled)


BF16 = Precision("bf16", torch.bfloat16, scaled=False)
FP16 = Precision("fp16", torch.float16, scaled=True)
FP32 = Precision("fp32", None, scaled=False)


def decide_precision(setting: PrecisionSetting, device: torch.device, bf16_native: bool | None = None) -> Precision:
    """`train.precision` on `device`; `bf16_native` (None: ask the device) says whether the GPU
    computes bfloat16 natively."""
    if device.type != "cuda" or setting == "fp32":
        return FP32
    if setting == "fp16":
        return FP16
    if bf16_native is None:
        bf16_native = bf16_is_native(device)
    if bf16_native:
        return BF16
    if setting == "bf16":
        raise ValueError(f"train.precision: bf16: the GPU {device} has no native bfloat16 (compute capability "
                         "below 8.0); use auto or fp16")
    return FP16


def bf16_is_native(device: torch.device) -> bool:
    """Whether the CUDA `device` computes bfloat16 in hardware (not torch's emulation)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def memory_format(channels_last: bool, device: torch.device, force: bool = False) -> torch.memory_format:
    """`train.channels_last` on `device`: channels-last 3D on CUDA (or anywhere with `force`),
    else torch's default (tensors keep their layout)."""
    if channels_last and (device.type == "cuda" or force):
        return torch.channels_last_3d
    return torch.preserve_format


def compile_network(network: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile `network`'s forward in place (it keeps its class and state_dict keys); returns it."""
    network.compile(backend=backend)
    return network


def smallest_grid(strides: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """The smallest (z, y, x) input the U-Net takes: a 2-voxel bottleneck (instance norm needs
    more than one voxel) times the product of the strides on each axis."""
    return tuple(2 * math.prod(s[axis] for s in strides) for axis in range(3))  # type: ignore[return-value]


def unreached_parameters(network: nn.Module, task_channels: Sequence[int],
                         strides: Sequence[Sequence[int]]) -> tuple[frozenset[str], ...]:
    """Per task, the names of the parameters requiring a gradient that a single-task batch of
    that task (`task_channels[i]` input channels) leaves without one under the deep-supervision
    loss weights. Runs the network once per task in training mode on `smallest_grid` (no
    random numbers drawn; buffers restored). A universal network's tasks with equal `reach_key`
    reach the same parameters, so one of them is run for all (200 tasks of one channel count: one
    pass, not 200)."""
    grid = smallest_grid(strides)
    named = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    buffers = {n: b.detach().clone() for n, b in network.named_buffers()}
    was_training = network.training
    network.train()
    reach_key = getattr(network, "reach_key", lambda task: (task,))
    probed: dict[tuple[int, ...], frozenset[str]] = {}
    unreached = []
    try:
        for task, channels in enumerate(task_channels):
            key = (*reach_key(task), channels)
            if key not in probed:
                probed[key] = _unreached_by(network, named, task, channels, grid)
            unreached.append(probed[key])
    finally:
        network.train(was_training)
        with torch.no_grad():
            for name, buffer in network.named_buffers():
                buffer.copy_(buffers[name])
    return tuple(unreached)


def _unreached_by(network: nn.Module, named: Sequence[tuple[str, nn.Parameter]], task: int, channels: int,
                  grid: tuple[int, int, int]) -> frozenset[str]:
    device = named[0][1].device
    x = torch.linspace(-1, 1, channels * math.prod(grid), device=device).reshape(1, channels, *grid)
    with torch.enable_grad():
        outputs = network(x, torch.tensor([task]))
        weights = deep_supervision_weights(len(outputs))
        total = sum(w * out.float().sum() for w, out in zip(weights, outputs) if w)
        grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    return frozenset(n for (n, _), g in zip(named, grads) if g is None)


def freeze_unreached(network: nn.Module, unreached: Sequence[frozenset[str]]) -> list[str]:
    """Turn off the gradient of the parameters no task reaches; returns their names."""
    never = sorted(frozenset.intersection(*unreached)) if unreached else []
    parameters = dict(network.named_parameters())
    for name in never:
        parameters[name].requires_grad_(False)
    return never


def find_unused_parameters(network: nn.Module, unreached: Sequence[frozenset[str]]) -> bool:
    """DDP's `find_unused_parameters` for `network` as it is now: True when a parameter that
    requires a gradient is left without one by some task's batch (`unreached_parameters`)."""
    trainable = {n for n, p in unwrap(network).named_parameters() if p.requires_grad}
    return any(trainable & names for names in unreached)


@dataclass(frozen=True)
class Execution:
    """How this worker's step runs (see the module docstring)."""

    precision: Precision
    memory_format: torch.memory_format
    compiled: bool
    unreached: tuple[frozenset[str], ...]  # per task (`unreached_parameters`)
    frozen: tuple[str, ...]  # parameters no task reaches, gradient off (`freeze_unreached`)

    def summary(self, network: nn.Module) -> str:
        layout = "channels-last" if self.memory_format == torch.channels_last_3d else "default layout"
        search = "on" if find_unused_parameters(network, self.unreached) else "off"
        frozen = f", {len(self.frozen)} parameter tensor(s) no task reaches frozen" if self.frozen else ""
        return (f"step: {self.precision.name}, {layout}, {'compiled' if self.compiled else 'eager'}, "
                f"DDP unused-parameter search {search}{frozen}")


def prepare_network(network: nn.Module, train: TrainConfig, device: torch.device, task_channels: Sequence[int],
                    strides: Sequence[Sequence[int]]) -> Execution:
    """Decide how the step runs and set `network` (already on `device`) up for it, in place:
    gradients of parameters no task reaches off, then channels-last, then compilation."""
    precision = decide_precision(train.precision, device)
    unreached = unreached_parameters(network, task_channels, strides)
    frozen = freeze_unreached(network, unreached)
    layout = memory_format(train.channels_last, device)
    if layout == torch.channels_last_3d:
        network.to(memory_format=layout)
    if train.compile:
        compile_network(network)
    return Execution(precision, layout, train.compile, unreached, tuple(frozen))
