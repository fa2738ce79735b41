"""Sliding-window inference of one volume (shared by validation, evaluate, predict and pyfunc).

MONAI's `sliding_window_inference` tiles and blends: windows of the patch size `overlap` apart
(the last one flush with the volume; a volume smaller than the patch zero-padded), in batches of
`window_batch_size`, each window's output weighted by a gaussian (sigma = patch / 8, nnU-Net's)
and the weighted sum divided by the summed weights. Ours is the predictor it calls: the task's
network under AMP on CUDA, softmax, mirroring test-time augmentation of each window batch (not
the volume: it costs compute, not memory). Our own nnU-Net-style tiler was level with MONAI's on
CPU (x0.91-1.03) and on an H200 (x1.02-1.06), short of the 1.2x that would justify keeping it
(benchmarks/README.md, issue 20).

Memory: the network's device only ever holds one window batch; the stitched probabilities
(num_classes + 1 float32 per voxel) live on `output_device`, the CPU by default, so a large scan
need not fit on the GPU.

`predict_scan` runs a raw image end to end with a model card: the task's preprocessing
(reorientation, crop, resampling to its spacing, normalisation), the sliding window, and the
mapping of labels (and probabilities) back to the original voxel grid.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from pipeline.common.geometry import preprocess_image, restore_probabilities
from pipeline.common.intensity import ChannelNormalization
from pipeline.common.model_card import ModelCard

GAUSSIAN_SIGMA_SCALE = 0.125


@dataclass(frozen=True)
class InferenceOptions:
    overlap: float = 0.5
    mirror_axes: tuple[int, ...] = ()  # spatial axes (0=z, 1=y, 2=x) mirrored for TTA
    window_batch_size: int = 2
    amp: bool = True
    amp_dtype: torch.dtype = torch.float16  # bfloat16 where the model trained under it (validation)
    progress: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise ValueError(f"mirror_axes must be among 0, 1, 2, got {self.mirror_axes}")
        if self.window_batch_size < 1:
            raise ValueError(f"window_batch_size must be >= 1, got {self.window_batch_size}")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags of InferenceOptions (predict and evaluate share them)."""
    group = parser.add_argument_group("inference")
    group.add_argument("--overlap", type=float, default=0.5,
                       help="fraction of a window shared with its neighbour (0.5)")
    group.add_argument("--tta", choices=("on", "off"), default="on",
                       help="mirroring test-time augmentation over z, y, x (8 passes)")
    group.add_argument("--window-batch-size", type=int, default=2, help="windows per forward pass (2)")
    group.add_argument("--no-amp", action="store_true", help="full precision on CUDA (AMP is used by default)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where windows run (auto: CUDA if present)")


def inference_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> InferenceOptions:
    """InferenceOptions from parsed flags; a bad value is a usage error."""
    try:
        return InferenceOptions(
            overlap=args.overlap,
            mirror_axes=(0, 1, 2) if args.tta == "on" else (),
            window_batch_size=args.window_batch_size,
            amp=not args.no_amp,
            progress=True,
        )
    except ValueError as err:
        parser.error(str(err))


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


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

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        return _mirrored_softmax(network, windows, task_id, num_classes, options)

    probabilities = sliding_window_inference(
        image[None], tuple(int(p) for p in patch_size), options.window_batch_size, predictor,
        overlap=options.overlap, mode="gaussian", sigma_scale=GAUSSIAN_SIGMA_SCALE, padding_mode="constant",
        sw_device=device, device=torch.device(output_device), progress=options.progress,
    )
    return probabilities[0]


def label_map(probabilities: torch.Tensor) -> torch.Tensor:
    """Label map (Z, Y, X) uint8 of softmax probabilities (num_classes, Z, Y, X): the likeliest class."""
    return probabilities.argmax(0).to(torch.uint8)


def _mirrored_softmax(
    network: nn.Module, batch: torch.Tensor, task_id: int, num_classes: int, options: InferenceOptions
) -> torch.Tensor:
    """Softmax of a window batch averaged over every mirroring of `options.mirror_axes`."""
    flips = _mirror_combinations(options.mirror_axes)
    total = None
    for dims in flips:
        flipped = torch.flip(batch, dims) if dims else batch
        with torch.autocast(batch.device.type, dtype=options.amp_dtype, enabled=options.amp and batch.device.type == "cuda"):
            logits = network(flipped, task_id)[0][:, :num_classes]
        probabilities = torch.softmax(logits.float(), dim=1)
        probabilities = torch.flip(probabilities, dims) if dims else probabilities
        total = probabilities if total is None else total.add_(probabilities)
    return total if len(flips) == 1 else total.div_(len(flips))


def _mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the mirrored axes, as tensor dims of a (B, C, Z, Y, X) batch."""
    dims = [a + 2 for a in axes]
    return [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]


# --- raw scans ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanPrediction:
    """One task's prediction on a raw image, on that image's own (x, y, z) voxel grid."""

    labels: np.ndarray  # (x, y, z) uint8
    probabilities: np.ndarray | None = None  # (num_classes, x, y, z) float32, when asked
    foreground: np.ndarray | None = None  # (x, y, z) float32, 1 - P(background), when asked


def predict_scan(
    network: nn.Module,
    card: ModelCard,
    task_id: int,
    image_cxyz: np.ndarray,
    affine: np.ndarray,
    options: InferenceOptions = InferenceOptions(),
    *,
    probabilities: bool = False,
    foreground: bool = False,
) -> ScanPrediction:
    """Preprocess a raw (C, x, y, z) image as the card's task says, segment it, map it back.

    The class probabilities go back to the original grid (linear, nnU-Net's separate-z rule) and
    the labels are their argmax there; outside the crop box: background. `foreground` alone
    keeps only the background channel.
    """
    task = card.tasks[task_id]
    if image_cxyz.shape[0] != task.in_channels:
        raise ValueError(f"image has {image_cxyz.shape[0]} channel(s) but task {task.name} needs {task.in_channels}")
    norms = tuple(ChannelNormalization.from_dict(n) for n in task.normalization)
    image, meta = preprocess_image(image_cxyz, affine, task.target_spacing, norms, task.image_order)
    volume = torch.from_numpy(image)
    stored = predict_probabilities(network, volume, task_id, task.num_classes, card.spec.patch_size, options)
    keep = range(task.num_classes) if probabilities else (0,) if foreground else ()
    labels, kept = restore_probabilities(stored.numpy(), meta, keep=tuple(keep))
    restored = np.stack([kept[c] for c in range(task.num_classes)]) if probabilities else None
    not_background = 1.0 - kept[0] if foreground else None
    return ScanPrediction(labels, restored, not_background)
