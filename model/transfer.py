"""Transfer a trained universal model to a new single task (UniSeg's downstream recipe).

Every weight whose name and shape match is loaded. The first decoder upsampling is adapted:
UniSeg feeds it the bottleneck plus the prompt channels, a plain U-Net only the bottleneck, so
the bottleneck part of its weight is kept. Segmentation heads are always re-initialised; prompt,
FUSE and stems for other channel counts are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from model.spec import NetworkSpec
from model.unet import PlainUNet

FIRST_UPSAMPLING = "decoder.upsample.0.weight"


@dataclass(frozen=True)
class TransferReport:
    loaded: tuple[str, ...]
    adapted: tuple[str, ...]
    reinitialised: tuple[str, ...]
    dropped: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"transfer: {len(self.loaded)} tensors loaded, {len(self.adapted)} adapted "
            f"({', '.join(self.adapted) or 'none'}), {len(self.reinitialised)} re-initialised "
            f"({', '.join(self.reinitialised) or 'none'}), {len(self.dropped)} dropped"
        )


def transfer_to_single_task(
    source_state: Mapping[str, torch.Tensor],
    spec: NetworkSpec,
    in_channels: int,
    num_classes: int,
) -> tuple[PlainUNet, TransferReport]:
    """Build a plain U-Net with the source's encoder-decoder and load what matches."""
    target = PlainUNet(spec.replace(architecture="plain"), in_channels, num_classes)
    state = target.state_dict()
    loaded, adapted, reinitialised = [], [], []
    for name, tensor in state.items():
        source = source_state.get(name)
        if name.startswith("heads.") or source is None:
            reinitialised.append(name)
        elif source.shape == tensor.shape:
            state[name] = source.clone()
            loaded.append(name)
        elif name == FIRST_UPSAMPLING and source.shape[1:] == tensor.shape[1:]:
            # ConvTranspose3d weights are (in, out, k...): keep the bottleneck inputs.
            state[name] = source[: tensor.shape[0]].clone()
            adapted.append(name)
        else:
            reinitialised.append(name)
    target.load_state_dict(state)
    dropped = sorted(set(source_state) - set(loaded) - set(adapted))
    report = TransferReport(tuple(loaded), tuple(adapted), tuple(reinitialised), tuple(dropped))
    return target, report
