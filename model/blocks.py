"""nnU-Net building blocks: Conv3d -> InstanceNorm3d(affine) -> LeakyReLU(0.01), and its He init."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Triple = tuple[int, int, int]
NEGATIVE_SLOPE = 0.01


def same_padding(kernel: Sequence[int]) -> Triple:
    return tuple(k // 2 for k in kernel)  # type: ignore[return-value]


def norm_act(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.InstanceNorm3d(channels, affine=True), nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True))


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


def he_init(network: nn.Module) -> nn.Module:
    """nnU-Net's InitWeights_He: every (transposed) convolution gets kaiming-normal weights for
    leaky ReLU 0.01 (std = sqrt(2 / (1 + 0.01^2) / fan_in)) and zero biases; norms and the
    prompt keep their own init. Returns `network`, changed in place."""
    for module in network.modules():
        if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
            nn.init.kaiming_normal_(module.weight, a=NEGATIVE_SLOPE)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return network
