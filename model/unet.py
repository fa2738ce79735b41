"""The nnU-Net style 3D U-Net parts shared by every architecture, and the plain single-task net."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.blocks import ConvNormAct, ConvStage, he_init, norm_act, same_padding
from model.spec import NetworkSpec


class Encoder(nn.Module):
    """Stages of ConvStage; the very first conv exists once per input channel count.

    Each sample is routed through the first conv that matches its own channel count, so a batch
    may mix tasks with 1, 2 or 4 channels (inputs are zero-padded to the widest sample).
    """

    def __init__(self, in_channels: Sequence[int], features: Sequence[int], strides: Sequence, kernels: Sequence):
        super().__init__()
        self.channel_counts = tuple(sorted(set(in_channels)))
        self.stems = nn.ModuleDict(
            {
                str(c): nn.Conv3d(c, features[0], tuple(kernels[0]), tuple(strides[0]), same_padding(kernels[0]))
                for c in self.channel_counts
            }
        )
        self.stem_rest = nn.Sequential(norm_act(features[0]), ConvNormAct(features[0], features[0], kernels[0]))
        self.stages = nn.ModuleList(
            ConvStage(features[i - 1], features[i], kernels[i], strides[i]) for i in range(1, len(features))
        )

    def forward(self, x: torch.Tensor, channels: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Return the feature maps of every stage, highest resolution first (last = bottleneck).

        `channels` holds each sample's channel count; None means all samples use x.shape[1].
        """
        x = self.stem_rest(self._stem(x, channels))
        features = [x]
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def _stem(self, x: torch.Tensor, channels: Sequence[int] | None) -> torch.Tensor:
        if channels is None or all(c == x.shape[1] for c in channels):
            return self.stems[str(x.shape[1])](x)
        outputs: list[torch.Tensor] = [x] * x.shape[0]
        for count in sorted(set(channels)):
            index = [i for i, c in enumerate(channels) if c == count]
            routed = self.stems[str(count)](x[index, :count])
            for i, sample in zip(index, routed):
                outputs[i] = sample
        return torch.stack(outputs)


class Decoder(nn.Module):
    """Transposed-conv upsampling, concatenation with the skip, ConvStage; one level per stride.

    `kernels[i]` is the kernel of the stage that outputs level i (`NetworkSpec.decoder_stage_kernels`).
    `extra_bottleneck_channels` widens the first upsampling input (UniSeg's prompt channel);
    `extra_last_channels` widens the input of the last (highest-resolution) stage, fed by `forward`'s
    `last_extra` (the task-aware-last-stage UniSeg variant).
    """

    def __init__(self, features: Sequence[int], strides: Sequence, kernels: Sequence, extra_bottleneck_channels: int = 0,
                 extra_last_channels: int = 0):
        super().__init__()
        deepest = len(features) - 1
        self.extra_last_channels = extra_last_channels
        self.upsample = nn.ModuleList()
        self.stages = nn.ModuleList()
        for level in range(deepest, 0, -1):
            in_channels = features[level] + (extra_bottleneck_channels if level == deepest else 0)
            stride = tuple(strides[level])
            extra = extra_last_channels if level == 1 else 0
            self.upsample.append(nn.ConvTranspose3d(in_channels, features[level - 1], stride, stride, bias=False))
            self.stages.append(ConvStage(2 * features[level - 1] + extra, features[level - 1], kernels[level - 1]))

    def forward(self, skips: Sequence[torch.Tensor], bottleneck: torch.Tensor,
                last_extra: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Return decoder features per level, highest resolution first; `last_extra` (B, extra_last_channels,
        ...) is resized to the last stage's grid and concatenated to its input."""
        if (last_extra is None) != (self.extra_last_channels == 0):
            raise ValueError(f"this decoder takes {self.extra_last_channels} extra channels at its last stage")
        x = bottleneck
        outputs = []
        for i, (up, stage, skip) in enumerate(zip(self.upsample, self.stages, reversed(skips))):
            inputs = [up(x), skip]
            if last_extra is not None and i == len(self.stages) - 1:
                inputs.append(F.interpolate(last_extra, size=skip.shape[2:], mode="trilinear", align_corners=False))
            x = stage(torch.cat(inputs, dim=1))
            outputs.append(x)
        return outputs[::-1]


class SegmentationHeads(nn.Module):
    """A 1x1x1 conv per decoder level (deep supervision) or only at full resolution."""

    def __init__(self, features: Sequence[int], num_outputs: int, deep_supervision: bool):
        super().__init__()
        levels = features[:-1] if deep_supervision else features[:1]
        self.convs = nn.ModuleList(nn.Conv3d(f, num_outputs, 1, bias=False) for f in levels)

    def forward(self, decoded: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.convs, decoded)]


class PlainUNet(nn.Module):
    """A single-task nnU-Net; also the target of transfer from a universal model."""

    def __init__(self, spec: NetworkSpec, in_channels: int, num_classes: int):
        super().__init__()
        self.spec = spec
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.encoder = Encoder([in_channels], spec.features, spec.strides, spec.kernels)
        self.decoder = Decoder(spec.features, spec.strides, spec.decoder_stage_kernels)
        self.heads = SegmentationHeads(spec.features, num_classes, spec.deep_supervision)
        he_init(self)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | Sequence[int] | int | None = None) -> list[torch.Tensor]:
        """Logits per deep-supervision level, highest resolution first.

        `task_ids` exists so every network shares one call signature; the only task is 0.
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, Z, Y, X), got {tuple(x.shape)}")
        if task_ids is not None and any(torch.as_tensor(task_ids).reshape(-1).tolist()):
            raise ValueError("a single-task network only knows task id 0")
        features = self.encoder(x)
        return self.heads(self.decoder(features[:-1], features[-1]))
