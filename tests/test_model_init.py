"""nnU-Net's He init: kaiming-normal convolution weights for leaky ReLU 0.01, zero biases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.presets import build_network, preset_spec
from model.tasks import TaskSpec
from model.unet import PlainUNet

TASKS = [TaskSpec("ct", 3, 1), TaskSpec("mr", 2, 2)]


def _standardised_weights(network: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """All conv weights divided by their He std sqrt(2 / (1 + 0.01^2) / fan_in), and all biases."""
    weights, biases = [], []
    for module in network.modules():
        if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
            fan_in = module.weight[0].numel()  # torch's fan_in: dim 1 and the kernel (in for conv, out for transposed)
            std = math.sqrt(2.0 / (1 + 0.01**2) / fan_in)
            weights.append(module.weight.detach().flatten() / std)
            if module.bias is not None:
                biases.append(module.bias.detach())
    return torch.cat(weights), biases


@pytest.mark.parametrize("architecture", ["uniseg", "multihead", "dodnet", "plain"])
def test_every_convolution_has_he_statistics(architecture: str) -> None:
    torch.manual_seed(0)
    spec = preset_spec("tiny", architecture=architecture)
    network = build_network(spec, TASKS[:1] if architecture == "plain" else TASKS)
    weights, biases = _standardised_weights(network)
    assert weights.numel() > 100_000
    # PyTorch's default (kaiming-uniform, a=sqrt(5)) would give a standardised std of 0.41.
    assert abs(weights.std().item() - 1.0) < 0.02
    assert abs(weights.mean().item()) < 0.02
    assert all(b.eq(0).all() for b in biases) and biases  # the stems and the dodnet controller carry biases


def test_each_layer_follows_its_own_fan_in() -> None:
    torch.manual_seed(1)
    network = PlainUNet(preset_spec("tiny", architecture="plain"), 1, 2)  # built directly, as transfer does
    wide = [m for m in network.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d) and m.weight.numel() > 20_000]
    assert len(wide) >= 4
    for module in wide:
        expected = math.sqrt(2.0 / (1 + 0.01**2) / module.weight[0].numel())
        assert module.weight.std().item() == pytest.approx(expected, rel=0.05)
