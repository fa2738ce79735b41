"""nnU-Net building blocks: Conv3d -> InstanceNorm3d(affine) -> LeakyReLU(0.01)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Triple = tuple[int, int, int]


def same_padding(kernel: Sequence[int]) -> Triple:
    return tuple(k // 2 for k in kernel)  # type: ignore[return-value]


def norm_act(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.InstanceNorm3d(channels, affine=True), nn.LeakyReLU(0.01, inplace=True))


class ConvNormAct(nn.Module):
    """One convolution followed by instance norm and leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1)):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, tuple(kernel), tuple(stride), same_padding(kernel))
        self.norm_act = norm_act(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_act(self.conv(x))


class ConvStage(nn.Module):
    """Two ConvNormAct blocks; the first one carries the stage's stride (downsampling)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1)):
        super().__init__()
        self.blocks = nn.Sequential(
            ConvNormAct(in_channels, out_channels, kernel, stride),
            ConvNormAct(out_channels, out_channels, kernel),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)
