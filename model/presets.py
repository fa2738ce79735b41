"""Named network presets and the one function that builds a network from a spec and tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from model.blocks import he_init
from model.spec import NetworkSpec
from model.tasks import TaskSpec
from model.topology import Triple, activation_count, plan_patch_and_topology, plan_topology
from model.unet import PlainUNet
from model.universal import DoDNet, MultiHeadUNet, UniSeg


def _uniseg(*, patch_size: Triple, features: tuple[int, ...], strides: tuple[Triple, ...],
            kernels: tuple[Triple, ...], **options: Any) -> NetworkSpec:
    """A UniSeg preset. Every preset keeps the paper's FUSE width (82, NetworkSpec's default): the
    tiny and cpu figures in the READMEs were measured with it (a width scaled to the bottleneck was
    never measured)."""
    return NetworkSpec("uniseg", patch_size, features, strides, kernels, **options)


PRESETS: dict[str, NetworkSpec] = {
    # The reference UniSeg: nnU-Net 3d_fullres topology for a 64x192x192 patch, its decoder wired as
    # the reference's Generic_UNet (nnU-Net v1) wires it: the last stage convolves 3x3x3.
    "uniseg-paper": _uniseg(
        patch_size=(64, 192, 192),
        features=(32, 64, 128, 256, 320, 320),
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
        kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
        decoder_kernels="nnunet-v1",
    ),
    # For real scans on CPU-only machines: a 40x80x80 patch (bottleneck 5x5x5), widths 12..128;
    # about 4x the tiny preset's compute per iteration.
    "cpu": _uniseg(
        patch_size=(40, 80, 80),
        features=(12, 24, 48, 96, 128),
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
        kernels=((3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    ),
    # Small enough to train on two CPU cores in minutes (tests and `make demo`).
    "tiny": _uniseg(
        patch_size=(32, 64, 64),
        features=(8, 16, 32, 64, 64),
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
        kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    ),
}

# The 11 upstream tasks of the paper: channels and classes, for summaries and
# benchmarks only. Training reads its task table from the Zarr stores.
REFERENCE_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("liver", 3, 1),
    TaskSpec("kidney", 3, 1),
    TaskSpec("hepatic_vessel", 3, 1),
    TaskSpec("pancreas", 3, 1),
    TaskSpec("colon", 2, 1),
    TaskSpec("lung", 2, 1),
    TaskSpec("spleen", 2, 1),
    TaskSpec("vertebrae", 2, 1),
    TaskSpec("prostate", 2, 1),
    TaskSpec("brats", 4, 4),
    TaskSpec("autopet", 2, 2),
)


def preset_spec(
    name: str,
    *,
    patch_size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    **overrides: Any,
) -> NetworkSpec:
    """A preset with overrides (architecture, features, prompt_channels, ...).

    Giving `patch_size` or `spacing` re-plans strides and kernels with nnU-Net's rule for as
    many stages as the preset (or the `features` override) has.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[name].replace(**{k: v for k, v in overrides.items() if v is not None})
    if patch_size is None and spacing is None:
        return spec
    return replan(spec, patch_size or spec.patch_size, spacing or (1.0, 1.0, 1.0))


def replan(spec: NetworkSpec, patch_size: Sequence[int], spacing: Sequence[float]) -> NetworkSpec:
    """`spec` with strides and kernels planned by nnU-Net's rule for this patch and spacing, for
    at most as many stages as it has features."""
    strides, kernels, patch = plan_topology(patch_size, spacing, max_stages=len(spec.features))
    return spec.replace(
        patch_size=patch,
        features=spec.features[: len(strides)],
        strides=tuple(strides),
        kernels=tuple(kernels),
    )


# UniSeg's reference network needs about 10 GB of GPU memory at batch 2; a planned
# network's memory is that figure scaled by its activation count (nnU-Net's planner likewise
# compares a static estimate against a reference network's).
REFERENCE_MEMORY_GB = 10.0
REFERENCE_BATCH = 2
BASE_FEATURES, MAX_FEATURES = 32, 320


def estimated_memory_gb(spec: NetworkSpec, batch_size: int = REFERENCE_BATCH) -> float:
    """Training memory of `spec` at `batch_size`, scaled from the reference UniSeg's 10 GB."""
    return _memory_gb(spec.patch_size, spec.strides, spec.features, batch_size)


def _memory_gb(patch: Sequence[int], strides: Sequence, features: Sequence[int], batch_size: int) -> float:
    reference = PRESETS["uniseg-paper"]
    ratio = activation_count(patch, strides, features) / activation_count(
        reference.patch_size, reference.strides, reference.features
    )
    return REFERENCE_MEMORY_GB * ratio * batch_size / REFERENCE_BATCH


def planned_spec(
    spacing: Sequence[float],
    median_shape: Sequence[int],
    memory_gb: float,
    batch_size: int = REFERENCE_BATCH,
    **overrides: Any,
) -> NetworkSpec:
    """nnU-Net's 3d_fullres plan for the universal net: patch and topology from the (median)
    spacing and median image shape, widths 32 doubling per stage up to 320, the patch shrunk
    until the estimated training memory at `batch_size` is within `memory_gb`."""
    template = PRESETS["uniseg-paper"].replace(**{k: v for k, v in overrides.items() if v is not None})

    def features_for(stages: int) -> tuple[int, ...]:
        return tuple(min(BASE_FEATURES * 2**s, MAX_FEATURES) for s in range(stages))

    def fits(patch: tuple[int, int, int], strides: list, features: tuple[int, ...]) -> bool:
        return _memory_gb(patch, strides, features, batch_size) <= memory_gb

    patch, strides, kernels, features = plan_patch_and_topology(spacing, median_shape, features_for, fits)
    return template.replace(patch_size=patch, strides=tuple(strides), kernels=tuple(kernels), features=features)


def build_network(spec: NetworkSpec, tasks: Sequence[TaskSpec]) -> nn.Module:
    """Build the network `spec.architecture` names for a task table, with nnU-Net's He init.

    `plain` builds a single-task U-Net and needs exactly one task.
    """
    if spec.architecture == "plain":
        if len(tasks) != 1:
            raise ValueError(f"a plain U-Net is single-task, got {len(tasks)} tasks")
        return PlainUNet(spec, tasks[0].in_channels, tasks[0].num_classes)
    networks = {"uniseg": UniSeg, "multihead": MultiHeadUNet, "dodnet": DoDNet}
    return he_init(networks[spec.architecture](spec, tasks))
