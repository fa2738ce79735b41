"""nnU-Net v2's training augmentation (nnUNetTrainer.get_training_transforms) as pure functions.

Every random draw comes from the numpy Generator passed in, so a sample is a function of its
seed. Arrays are (C, Z, Y, X) float32 images and (Z, Y, X) uint8 labels.

Spatial (elastic deformation off, as in nnU-Net and UniSeg): with probability 0.2 a rotation,
independently with probability 0.2 one scale factor for all axes in [0.7, 1.4] (> 1 zooms out).
Rotation is up to 30 degrees about each axis, or, when the patch is anisotropic
(max(patch) / patch[0] > 3, nnU-Net's "dummy 2D" case), up to 180 degrees in the (y, x) plane
only, with z neither rotated nor scaled. `resample_patch` evaluates the final patch on the
transformed grid about a centre: nnU-Net reads a larger patch and does the same about its
centre, which is a centre crop of the transformed larger patch. Images are interpolated
linearly, labels per class linearly then argmax (nnU-Net's default for segmentations).

Intensity, in nnU-Net's order and with its probabilities (per sample, then per channel):
gaussian noise 0.1 (std in [0, 0.1], all channels), gaussian blur 0.2 (each channel 0.5,
sigma in [0.5, 1] per axis), multiplicative brightness 0.15 and contrast 0.15 (factors in
[0.75, 1.25]: half the draws below 1, half above), low resolution 0.25 (each channel 0.5,
zoom in [0.5, 1], nearest down, linear up; z kept for anisotropic patches), inverted gamma 0.1
and gamma 0.3 (gamma in [0.7, 1.5], half the draws below 1; mean and std kept); then mirroring
of each axis with probability 0.5 (image and label).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

ANISOTROPY_RATIO = 3.0
Image = np.ndarray
Label = np.ndarray


@dataclass(frozen=True)
class SpatialRanges:
    """nnU-Net's spatial augmentation ranges for one patch shape."""

    max_rotation: float  # radians, each rotation angle is uniform in [-max, max]
    in_plane: bool  # anisotropic patch: rotate and scale in (y, x) only
    p_rotation: float = 0.2
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)


@dataclass(frozen=True)
class Augmentation:
    """What `pipeline.train.data` applies: spatial ranges (None: off), intensity, mirroring."""

    spatial: SpatialRanges | None
    intensity: bool
    mirror_axes: tuple[int, ...]


def nnunet_augmentation(patch_size: Sequence[int]) -> Augmentation:
    in_plane = max(patch_size) / patch_size[0] > ANISOTROPY_RATIO
    rotation = math.pi if in_plane else math.pi / 6
    return Augmentation(SpatialRanges(rotation, in_plane), intensity=True, mirror_axes=(0, 1, 2))


def no_augmentation(patch_size: Sequence[int]) -> Augmentation:
    return Augmentation(None, intensity=False, mirror_axes=())


AUGMENTATIONS: dict[str, Callable[[Sequence[int]], Augmentation]] = {
    "nnunet": nnunet_augmentation,
    "none": no_augmentation,
}


# --- spatial -----------------------------------------------------------------------------


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """Rotation by angles[a] about array axis a (z, y, x), about z first, then y, then x."""
    matrix = np.eye(3)
    for axis in (0, 1, 2):
        i, j = [a for a in range(3) if a != axis]
        c, s = math.cos(angles[axis]), math.sin(angles[axis])
        rotation = np.eye(3)
        rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
        matrix = rotation @ matrix
    return matrix


def draw_spatial(rng: np.random.Generator, ranges: SpatialRanges | None) -> np.ndarray | None:
    """A 3x3 matrix taking offsets in the final patch (voxels, z y x) to offsets in the volume,
    or None when this sample is neither rotated nor scaled (nnU-Net then crops without
    interpolating)."""
    if ranges is None:
        return None
    rotate = rng.random() < ranges.p_rotation
    scale = rng.random() < ranges.p_scaling
    if not rotate and not scale:
        return None
    angles = np.zeros(3)
    if rotate:
        axes = (0,) if ranges.in_plane else (0, 1, 2)
        angles[list(axes)] = rng.uniform(-ranges.max_rotation, ranges.max_rotation, len(axes))
    factor = rng.uniform(*ranges.scaling) if scale else 1.0
    factors = (1.0, factor, factor) if ranges.in_plane else (factor,) * 3
    return rotation_matrix(angles) @ np.diag(factors)


def half_extent(matrix: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
    """Per volume axis, how far the transformed patch's voxel centres reach from its centre."""
    return np.abs(matrix) @ ((np.asarray(patch_size, dtype=np.float64) - 1) / 2)


def resample_patch(
    image: Image, label: Label, matrix: np.ndarray, centre: Sequence[float], patch_size: Sequence[int]
) -> tuple[Image, Label]:
    """The final patch on the grid `centre + matrix @ offset` of `image` / `label` (voxel
    coordinates of these arrays); outside them the image is 0 and the label background."""
    patch = tuple(int(p) for p in patch_size)
    axes = [torch.arange(p, dtype=torch.float64) - (p - 1) / 2 for p in patch]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    coords = offsets @ torch.from_numpy(matrix).T + torch.tensor(centre, dtype=torch.float64)
    size = torch.tensor([max(n - 1, 1) for n in label.shape], dtype=torch.float64)
    grid = (2 * coords / size - 1).flip(-1).float()[None]  # grid_sample wants (x, y, z)
    source = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    out_image = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    return out_image.numpy(), _resample_label(label, grid)


def _resample_label(label: Label, grid: torch.Tensor) -> Label:
    """Each class's mask interpolated linearly; per voxel the class with the highest value (the
    lowest class on ties, so outside the arrays it is background)."""
    best = torch.zeros(grid.shape[1:4])
    out = torch.zeros(grid.shape[1:4], dtype=torch.uint8)
    for value in np.unique(label):
        mask = torch.from_numpy((label == value).astype(np.float32))[None, None]
        score = F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
        better = score > best
        out[better] = int(value)
        best = torch.maximum(best, score)
    return out.numpy()


# --- intensity -----------------------------------------------------------------------------


def _below_or_above_one(rng: np.random.Generator, low: float, high: float) -> float:
    """nnU-Net's BGContrast: half the draws in [low, 1), half in [1, high]."""
    if rng.random() < 0.5 and low < 1:
        return float(rng.uniform(low, 1))
    return float(rng.uniform(max(low, 1), high))


def gaussian_noise(image: Image, rng: np.random.Generator, in_plane: bool) -> Image:
    std = rng.uniform(0, 0.1)
    return image + (rng.standard_normal(image.shape) * std).astype(np.float32)


def gaussian_blur(image: Image, rng: np.random.Generator, in_plane: bool) -> Image:
    for c in range(image.shape[0]):
        if rng.random() < 0.5:
            image[c] = ndimage.gaussian_filter(image[c], sigma=rng.uniform(0.5, 1.0, 3))
    return image


def brightness(image: Image, rng: np.random.Generator, in_plane: bool) -> Image:
    for c in range(image.shape[0]):
        image[c] *= _below_or_above_one(rng, 0.75, 1.25)
    return image


def contrast(image: Image, rng: np.random.Generator, in_plane: bool) -> Image:
    for c in range(image.shape[0]):
        x = image[c]
        mean, low, high = x.mean(), x.min(), x.max()
        image[c] = np.clip((x - mean) * _below_or_above_one(rng, 0.75, 1.25) + mean, low, high)
    return image


def low_resolution(image: Image, rng: np.random.Generator, in_plane: bool) -> Image:
    shape = image.shape[1:]
    for c in range(image.shape[0]):
        if rng.random() < 0.5:
            zoom = rng.uniform(0.5, 1.0)
            small = [n if in_plane and a == 0 else max(1, round(n * zoom)) for a, n in enumerate(shape)]
            x = torch.from_numpy(image[c])[None, None]
            down = F.interpolate(x, size=small, mode="nearest-exact")
            image[c] = F.interpolate(down, size=shape, mode="trilinear")[0, 0].numpy()
    return image


def _gamma(image: Image, rng: np.random.Generator, invert: bool) -> Image:
    for c in range(image.shape[0]):
        x = -image[c] if invert else image[c]
        mean, std = x.mean(), x.std()
        low, span = x.min(), x.max() - x.min()
        x = np.power((x - low) / max(span, 1e-7), _below_or_above_one(rng, 0.7, 1.5)) * span + low
        x = (x - x.mean()) * (std / max(x.std(), 1e-7)) + mean
        image[c] = -x if invert else x
    return image


def inverted_gamma(image: Image, rng: np.random.Generator, in_plane: bool) -> Image:
    return _gamma(image, rng, invert=True)


def gamma(image: Image, rng: np.random.Generator, in_plane: bool) -> Image:
    return _gamma(image, rng, invert=False)


INTENSITY: tuple[tuple[float, Callable[[Image, np.random.Generator, bool], Image]], ...] = (
    (0.1, gaussian_noise),
    (0.2, gaussian_blur),
    (0.15, brightness),
    (0.15, contrast),
    (0.25, low_resolution),
    (0.1, inverted_gamma),
    (0.3, gamma),
)


def augment_intensity(image: Image, rng: np.random.Generator, in_plane: bool = False) -> Image:
    """nnU-Net's intensity transforms, each with its probability (changes `image` in place)."""
    for probability, transform in INTENSITY:
        if rng.random() < probability:
            image = transform(image, rng, in_plane)
    return image


def mirror(image: Image, label: Label, rng: np.random.Generator, axes: Sequence[int]) -> tuple[Image, Label]:
    """Flip each of `axes` (0 = z) with probability 0.5, image and label alike."""
    flipped = [a for a in axes if rng.random() < 0.5]
    if not flipped:
        return image, label
    return (np.ascontiguousarray(np.flip(image, [a + 1 for a in flipped])),
            np.ascontiguousarray(np.flip(label, flipped)))
