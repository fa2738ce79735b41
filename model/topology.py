"""Strides and kernels from patch size and spacing, following nnU-Net's planning rule.

Axes are (z, y, x) throughout. At every stage an axis is downsampled when its feature map stays
at least `min_feature_size` and its current spacing is within a factor 2 of the finest one, so
coarse (anisotropic) axes wait until the others catch up. An axis gets 3-wide kernels once its
spacing is within a factor 2 of the finest; before that its kernel is 1 wide.

`plan_patch_and_topology` is nnU-Net's planner around that rule: start from a patch of 256^3
voxels shaped by the spacing and capped by the median image shape, and shrink it until the
network fits a memory budget (estimated from `activation_count`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Triple = tuple[int, int, int]


def plan_topology(
    patch_size: Sequence[int],
    spacing: Sequence[float],
    max_stages: int = 6,
    min_feature_size: int = 4,
) -> tuple[list[Triple], list[Triple], Triple]:
    """Return (strides, kernels, patch_size) with one entry per stage, stem first.

    The patch is rounded up so each axis is divisible by its total downsampling factor.
    """
    if len(patch_size) != 3 or len(spacing) != 3:
        raise ValueError(f"patch_size and spacing must have 3 values (z, y, x), got {patch_size} and {spacing}")
    if min(spacing) <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    size = [float(s) for s in patch_size]
    current = [float(s) for s in spacing]
    kernel = [3 if s / min(current) < 2 else 1 for s in current]
    strides: list[Triple] = [(1, 1, 1)]
    kernels: list[Triple] = [tuple(kernel)]  # type: ignore[list-item]
    while len(strides) < max_stages:
        axes = _axes_to_pool(size, current, min_feature_size)
        if not axes:
            break
        stride = [2 if a in axes else 1 for a in range(3)]
        for a in axes:
            current[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        kernel = [3 if k == 3 or current[a] / min(current) < 2 else 1 for a, k in enumerate(kernel)]
        strides.append(tuple(stride))  # type: ignore[arg-type]
        kernels.append(tuple(kernel))  # type: ignore[arg-type]
    factor = total_stride(strides)
    patch = tuple(math.ceil(p / f) * f for p, f in zip(patch_size, factor))
    return strides, kernels, patch  # type: ignore[return-value]


def total_stride(strides: Sequence[Sequence[int]]) -> Triple:
    """Product of the strides per axis: the factor each patch axis must be divisible by."""
    return tuple(math.prod(s[a] for s in strides) for a in range(3))  # type: ignore[return-value]


def _axes_to_pool(size: list[float], spacing: list[float], min_feature_size: int) -> list[int]:
    candidates = [a for a in range(3) if size[a] >= 2 * min_feature_size]
    if not candidates:
        return []
    finest = min(spacing[a] for a in candidates)
    axes = [a for a in candidates if spacing[a] / finest < 2]
    # A single axis left is only pooled while it stays clearly above the minimum size.
    if len(axes) == 1 and size[axes[0]] < 3 * min_feature_size:
        return []
    return axes


def activation_count(patch_size: Sequence[int], strides: Sequence[Sequence[int]], features: Sequence[int]) -> int:
    """Feature-map values one sample keeps for the backward pass, the quantity nnU-Net's planner
    estimates memory from: per encoder stage two conv outputs and their norms, per decoder stage
    the upsampled map, the skip concatenation and again two conv outputs and norms."""
    size = [float(p) for p in patch_size]
    total = 0.0
    for stage, (stride, channels) in enumerate(zip(strides, features)):
        size = [s / st for s, st in zip(size, stride)]
        voxels = math.prod(size)
        total += 4 * channels * voxels
        if stage < len(features) - 1:
            total += (channels + 2 * channels + 4 * channels) * voxels
    return int(total)


def initial_patch_size(spacing: Sequence[float], median_shape: Sequence[int], volume: int = 256**3) -> Triple:
    """nnU-Net's starting patch: `volume` voxels shaped like 1 / spacing (isotropic in mm),
    no larger than the median shape."""
    inverse = [1.0 / s for s in spacing]
    scale = (volume / math.prod(inverse)) ** (1 / 3)
    return tuple(max(1, min(round(i * scale), int(m))) for i, m in zip(inverse, median_shape))  # type: ignore[return-value]


def plan_patch_and_topology(
    spacing: Sequence[float],
    median_shape: Sequence[int],
    features_for: Callable[[int], tuple[int, ...]],
    fits: Callable[[Triple, list[Triple], tuple[int, ...]], bool],
    max_stages: int = 6,
) -> tuple[Triple, list[Triple], list[Triple], tuple[int, ...]]:
    """nnU-Net's planner loop: from the initial patch, while the network does not `fit`, shrink
    the axis that is largest relative to the median shape by its divisibility factor and re-plan.

    Returns (patch_size, strides, kernels, features); `features_for(stages)` gives the widths.
    """
    patch = list(initial_patch_size(spacing, median_shape))
    while True:
        strides, kernels, planned = plan_topology(patch, spacing, max_stages=max_stages)
        features = features_for(len(strides))
        if fits(planned, strides, features):
            return planned, strides, kernels, features
        factor = total_stride(strides)
        shrinkable = [a for a in range(3) if planned[a] > factor[a]]
        if not shrinkable:
            raise ValueError(f"no patch fits: even {planned} at spacing {tuple(spacing)} is over the memory budget")
        axis = max(shrinkable, key=lambda a: planned[a] / median_shape[a])
        patch = list(planned)
        patch[axis] -= factor[axis]
