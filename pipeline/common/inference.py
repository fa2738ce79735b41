"""Sliding-window inference of one preprocessed volume (shared by validation, evaluate, predict).

Windows of the training patch size with gaussian weighting and a configurable overlap, batched,
optional mirroring test-time augmentation, AMP on CUDA. Windows run on the network's device;
the stitched output stays on `output_device` so large scans need not fit on the GPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.inferers import sliding_window_inference
from torch import nn


@dataclass(frozen=True)
class InferenceOptions:
    overlap: float = 0.5
    mirror_axes: tuple[int, ...] = ()  # spatial axes (0=z, 1=y, 2=x) mirrored for TTA
    window_batch_size: int = 2
    amp: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise ValueError(f"mirror_axes must be among 0, 1, 2, got {self.mirror_axes}")


@torch.no_grad()
def predict_probabilities(
    network: nn.Module,
    image: torch.Tensor,
    task_id: int,
    num_classes: int,
    patch_size: Sequence[int],
    options: InferenceOptions = InferenceOptions(),
    output_device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Softmax probabilities (num_classes, Z, Y, X) of a (C, Z, Y, X) image for one task."""
    device = next(network.parameters()).device
    batch = image[None].to(device)

    def window_logits(windows: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, enabled=options.amp and device.type == "cuda"):
            return network(windows, task_id)[0][:, :num_classes].float()

    probabilities = None
    flips = _mirror_combinations(options.mirror_axes)
    for dims in flips:
        flipped = torch.flip(batch, dims) if dims else batch
        logits = sliding_window_inference(
            flipped,
            roi_size=tuple(patch_size),
            sw_batch_size=options.window_batch_size,
            predictor=window_logits,
            overlap=options.overlap,
            mode="gaussian",
            sw_device=device,
            device=torch.device(output_device),
            progress=options.progress,
        )
        probs = torch.softmax(logits, dim=1)
        probs = torch.flip(probs, dims) if dims else probs
        probabilities = probs if probabilities is None else probabilities + probs
    return (probabilities / len(flips))[0]


def segment(
    network: nn.Module,
    image: torch.Tensor,
    task_id: int,
    num_classes: int,
    patch_size: Sequence[int],
    options: InferenceOptions = InferenceOptions(),
) -> torch.Tensor:
    """Label map (Z, Y, X) uint8 of a (C, Z, Y, X) image for one task."""
    probabilities = predict_probabilities(network, image, task_id, num_classes, patch_size, options)
    return probabilities.argmax(0).to(torch.uint8)


def _mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the mirrored axes, as tensor dims of a (B, C, Z, Y, X) batch."""
    dims = [a + 2 for a in axes]
    return [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]
