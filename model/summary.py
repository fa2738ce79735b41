"""Architecture summary: parameters, bottleneck shape and MACs, computed on the meta device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.presets import build_network
from model.spec import NetworkSpec
from model.tasks import TaskSpec


@dataclass(frozen=True)
class ArchitectureSummary:
    architecture: str
    num_tasks: int
    parameters: int
    patch_size: tuple[int, int, int]
    bottleneck_shape: tuple[int, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    macs: int

    def lines(self) -> list[str]:
        return [
            f"architecture      {self.architecture} ({self.num_tasks} tasks)",
            f"parameters        {self.parameters:,} ({self.parameters / 1e6:.2f} M)",
            f"patch (z, y, x)   {self.patch_size}",
            f"bottleneck        {self.bottleneck_shape} (channels, z, y, x)",
            f"outputs           {', '.join(str(s) for s in self.output_shapes)}",
            f"MACs per forward  {self.macs / 1e9:.1f} G (batch 1, task 0)",
        ]


def forward_flops(spec: NetworkSpec, tasks: Sequence[TaskSpec], batch_size: int = 1) -> int:
    """FLOPs (2 x MACs) of one forward pass on a patch, counted without allocating memory."""
    return summarize(spec, tasks, batch_size).macs * 2


def summarize(spec: NetworkSpec, tasks: Sequence[TaskSpec], batch_size: int = 1) -> ArchitectureSummary:
    with torch.device("meta"):
        network = build_network(spec, tasks)
        x = torch.empty(batch_size, tasks[0].in_channels, *spec.patch_size)
    bottleneck: list[tuple[int, ...]] = []
    hook = network.encoder.stages[-1].register_forward_hook(
        lambda _m, _i, out: bottleneck.append(tuple(out.shape[1:]))
    )
    with FlopCounterMode(display=False) as counter:
        outputs = network(x, 0)
    hook.remove()
    return ArchitectureSummary(
        architecture=spec.architecture,
        num_tasks=len(tasks),
        parameters=sum(p.numel() for p in network.parameters()),
        patch_size=spec.patch_size,
        bottleneck_shape=bottleneck[0],
        output_shapes=tuple(tuple(o.shape[1:]) for o in outputs),
        macs=counter.get_total_flops() // 2,
    )
