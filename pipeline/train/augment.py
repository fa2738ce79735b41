"""nnU-Net v2's training augmentation (nnUNetTrainer.get_training_transforms): draws, then torch ops.

Drawing and applying are apart. Every random choice of a sample comes from the numpy Generator
passed to the `draw_*` functions (so a sample is a function of its seed) and lands in a
`SampleDraw`; `augment` applies one with torch ops on whatever device its tensors are on: the
loader workers' CPU, or the training worker's GPU (`train.augment_on`, `pipeline/train/data.py`).
The one random field, gaussian noise, comes from a torch Generator seeded with a drawn seed.
Tensors are (C, Z, Y, X) float32 images and (Z, Y, X) uint8 labels.

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
sigma in [0.5, 1] per axis; scipy's kernel: truncated at 4 sigma, mirrored edges), multiplicative
brightness 0.15 and contrast 0.15 (factors in [0.75, 1.25]: half the draws below 1, half above),
low resolution 0.25 (each channel 0.5, zoom in [0.5, 1], nearest down, linear up; z kept for
anisotropic patches), inverted gamma 0.1 and gamma 0.3 (gamma in [0.7, 1.5], half the draws
below 1; mean and std kept); then mirroring of each axis with probability 0.5 (image and label).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ANISOTROPY_RATIO = 3.0
Triple = tuple[int, int, int]


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
    """What `pipeline.train.data` draws: spatial ranges (None: off), the intensity transforms
    (INTENSITY names) with their probabilities in the order they apply, and mirroring."""

    spatial: SpatialRanges | None
    intensity: tuple[tuple[str, float], ...]
    mirror_axes: tuple[int, ...]
    p_mirror: float = 0.5  # per axis

    @property
    def in_plane(self) -> bool:
        return self.spatial is not None and self.spatial.in_plane


NNUNET_INTENSITY = (("gaussian_noise", 0.1), ("gaussian_blur", 0.2), ("brightness", 0.15), ("contrast", 0.15),
                    ("low_resolution", 0.25), ("inverted_gamma", 0.1), ("gamma", 0.3))


def nnunet_augmentation(patch_size: Sequence[int]) -> Augmentation:
    in_plane = max(patch_size) / patch_size[0] > ANISOTROPY_RATIO
    rotation = math.pi if in_plane else math.pi / 6
    return Augmentation(SpatialRanges(rotation, in_plane), NNUNET_INTENSITY, mirror_axes=(0, 1, 2))


def no_augmentation(patch_size: Sequence[int]) -> Augmentation:
    return Augmentation(None, intensity=(), mirror_axes=())


AUGMENTATIONS: dict[str, Callable[[Sequence[int]], Augmentation]] = {
    "nnunet": nnunet_augmentation,
    "none": no_augmentation,
}


@dataclass(frozen=True)
class SampleDraw:
    """Every random choice of one sample's augmentation, for `augment` to apply to its region.

    `matrix` None: the region is the final patch (neither rotated nor scaled: nnU-Net crops
    without interpolating). Otherwise the final patch is `centre + matrix @ offset` in the
    region's voxel coordinates, and `labels` are the label values present in the region (the
    classes the label resampling interpolates; read where the region is, so the device needs
    no look at the data first). Plain numbers and tuples: small to ship, compared with ==."""

    matrix: tuple[tuple[float, float, float], ...] | None  # rows of the 3x3 matrix
    centre: tuple[float, float, float]
    patch: Triple
    labels: tuple[int, ...]
    intensity: tuple[tuple[str, tuple[Any, ...]], ...]  # (INTENSITY name, its parameters), in the order they apply
    flips: tuple[int, ...]  # mirrored axes, 0 = z


def augment(image: torch.Tensor, label: torch.Tensor, draw: SampleDraw) -> tuple[torch.Tensor, torch.Tensor]:
    """The final (image, label) of one sample from its region and draw, on the tensors' device
    (may change `image` in place)."""
    if draw.matrix is not None:
        image, label = resample_patch(image, label, draw.matrix, draw.centre, draw.patch, draw.labels)
    for name, parameters in draw.intensity:
        image = INTENSITY[name][1](image, parameters)
    if draw.flips:
        image, label = image.flip([a + 1 for a in draw.flips]), label.flip(list(draw.flips))
    return image, label


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


def resample_patch(image: torch.Tensor, label: torch.Tensor, matrix: np.ndarray | Sequence[Sequence[float]],
                   centre: Sequence[float], patch_size: Sequence[int],
                   labels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The final patch on the grid `centre + matrix @ offset` of `image` / `label` (voxel
    coordinates of these tensors); outside them the image is 0 and the label background.
    `labels`: the values the label may hold (each interpolated as its own mask)."""
    patch = tuple(int(p) for p in patch_size)
    grid = F.affine_grid(_grid_affine(matrix, centre, patch, label.shape).to(image.device),
                         [1, 1, *patch], align_corners=True)
    out_image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    return out_image, _resample_label(label, grid, labels)


def _grid_affine(matrix: np.ndarray | Sequence[Sequence[float]], centre: Sequence[float], patch: Triple,
                 shape: Sequence[int]) -> torch.Tensor:
    """affine_grid's theta (1, 3, 4, axes x y z) for `centre + matrix @ offset`: its base grid
    runs over [-1, 1] along each patch axis (offset = base * (p - 1) / 2), its output is in
    grid_sample's [-1, 1] over each source axis (align_corners)."""
    to_unit = np.diag([2 / max(n - 1, 1) for n in shape])
    linear = to_unit @ np.asarray(matrix, dtype=np.float64) @ np.diag([(p - 1) / 2 for p in patch])
    shift = to_unit @ np.asarray(centre, dtype=np.float64) - 1
    theta = np.concatenate([linear[::-1, ::-1], shift[::-1, None]], axis=1)  # (z, y, x) -> grid_sample's (x, y, z)
    return torch.from_numpy(theta.astype(np.float32))[None]


def _resample_label(label: torch.Tensor, grid: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """Each class's mask interpolated linearly; per voxel the class with the highest value (the
    lowest class on ties, so outside the tensor it is background)."""
    best = torch.zeros(grid.shape[1:4], device=label.device)
    out = torch.zeros(grid.shape[1:4], dtype=torch.uint8, device=label.device)
    hit = torch.empty(label.shape, dtype=torch.bool, device=label.device)  # reused: fresh pages cost on a CPU
    mask = torch.empty((1, 1, *label.shape), device=label.device)
    for value in sorted(labels):
        mask[0, 0].copy_(torch.eq(label, value, out=hit))
        score = F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
        out.masked_fill_(score > best, value)
        torch.maximum(best, score, out=best)
    return out


# --- intensity: each transform's draw (numpy) and its application (torch) ---------------------


def _below_or_above_one(rng: np.random.Generator, low: float, high: float) -> float:
    """nnU-Net's BGContrast: half the draws in [low, 1), half in [1, high]."""
    if rng.random() < 0.5 and low < 1:
        return float(rng.uniform(low, 1))
    return float(rng.uniform(max(low, 1), high))


def _per_channel(rng: np.random.Generator, channels: int, probability: float,
                 draw: Callable[[], Any]) -> tuple[Any, ...]:
    """Per channel, `draw()` with `probability`, else None."""
    drawn = []
    for _ in range(channels):
        drawn.append(draw() if rng.random() < probability else None)
    return tuple(drawn)


def draw_noise(rng: np.random.Generator, channels: int, in_plane: bool) -> tuple[float, int]:
    """(std, seed of the noise field)."""
    return float(rng.uniform(0, 0.1)), int(rng.integers(2**63))


def gaussian_noise(image: torch.Tensor, parameters: tuple[float, int]) -> torch.Tensor:
    std, seed = parameters
    generator = torch.Generator(device=image.device).manual_seed(seed)
    noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
    return image.add_(noise, alpha=std)


def draw_blur(rng: np.random.Generator, channels: int, in_plane: bool) -> tuple[tuple[float, ...] | None, ...]:
    """Per channel, with probability 0.5, sigma per axis (z, y, x)."""
    return _per_channel(rng, channels, 0.5, lambda: tuple(float(s) for s in rng.uniform(0.5, 1.0, 3)))


def gaussian_blur(image: torch.Tensor, sigmas: tuple[tuple[float, ...] | None, ...]) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter's result (truncate 4, mode "reflect"), as one banded matrix
    product per axis: far faster than a 1-D convolution on one CPU thread, and plain on a GPU."""
    z, y, x = image.shape[1:]
    for c, sigma in enumerate(sigmas):
        if sigma is None:
            continue
        blurred = image[c] @ _blur_matrix(x, sigma[2], image.device).T
        blurred = _blur_matrix(y, sigma[1], image.device) @ blurred
        image[c] = (_blur_matrix(z, sigma[0], image.device) @ blurred.reshape(z, y * x)).reshape(z, y, x)
    return image


def _blur_matrix(n: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(n, n): row i holds the gaussian weights of output voxel i over the input voxels, the
    kernel's taps past an edge folded back as scipy's "reflect" (d c b a | a b c d | d c b a)."""
    radius = int(4.0 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, device=device)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    source = (torch.arange(n, device=device)[:, None] + taps) % (2 * n)
    source = torch.where(source >= n, 2 * n - 1 - source, source)
    matrix = torch.zeros(n, n, device=device)
    return matrix.scatter_add_(1, source, (weights / weights.sum()).expand(n, -1).contiguous())


def draw_factors(rng: np.random.Generator, channels: int, in_plane: bool) -> tuple[float, ...]:
    """Per channel a factor in [0.75, 1.25], half the draws below 1 (brightness and contrast)."""
    return tuple(_below_or_above_one(rng, 0.75, 1.25) for _ in range(channels))


def brightness(image: torch.Tensor, factors: tuple[float, ...]) -> torch.Tensor:
    for c, factor in enumerate(factors):
        image[c] *= factor
    return image


def contrast(image: torch.Tensor, factors: tuple[float, ...]) -> torch.Tensor:
    """Spread about the mean by the factor, clipped to the channel's former range."""
    for c, factor in enumerate(factors):
        x = image[c]
        mean, (low, high) = x.mean(), torch.aminmax(x)
        x.sub_(mean).mul_(factor).add_(mean).clamp_(low, high)
    return image


def draw_low_resolution(rng: np.random.Generator, channels: int,
                        in_plane: bool) -> tuple[tuple[float, ...] | None, ...]:
    """Per channel, with probability 0.5, a zoom per axis (one value; z kept for anisotropic patches)."""
    def zooms() -> tuple[float, ...]:
        zoom = float(rng.uniform(0.5, 1.0))
        return (1.0, zoom, zoom) if in_plane else (zoom, zoom, zoom)

    return _per_channel(rng, channels, 0.5, zooms)


def low_resolution(image: torch.Tensor, zooms: tuple[tuple[float, ...] | None, ...]) -> torch.Tensor:
    shape = image.shape[1:]
    for c, zoom in enumerate(zooms):
        if zoom is None:
            continue
        small = [max(1, round(n * z)) for n, z in zip(shape, zoom)]
        down = F.interpolate(image[c][None, None], size=small, mode="nearest-exact")
        image[c] = F.interpolate(down, size=shape, mode="trilinear")[0, 0]
    return image


def draw_gamma(rng: np.random.Generator, channels: int, in_plane: bool) -> tuple[float, ...]:
    """Per channel a gamma in [0.7, 1.5], half the draws below 1."""
    return tuple(_below_or_above_one(rng, 0.7, 1.5) for _ in range(channels))


def _gamma(image: torch.Tensor, gammas: tuple[float, ...], invert: bool) -> torch.Tensor:
    for c, value in enumerate(gammas):
        x = image[c].neg_() if invert else image[c]
        mean, std = x.mean(), x.std(correction=0)
        low, high = torch.aminmax(x)
        span = high - low
        x.sub_(low).div_(span.clamp(min=1e-7)).pow_(value).mul_(span).add_(low)
        x.sub_(x.mean()).mul_(std / x.std(correction=0).clamp(min=1e-7)).add_(mean)
        if invert:
            x.neg_()
    return image


def inverted_gamma(image: torch.Tensor, gammas: tuple[float, ...]) -> torch.Tensor:
    return _gamma(image, gammas, invert=True)


def gamma(image: torch.Tensor, gammas: tuple[float, ...]) -> torch.Tensor:
    return _gamma(image, gammas, invert=False)


Draw = Callable[[np.random.Generator, int, bool], tuple[Any, ...]]  # (rng, channels, in_plane) -> parameters
Apply = Callable[[torch.Tensor, tuple[Any, ...]], torch.Tensor]  # (image, parameters) -> image
INTENSITY: dict[str, tuple[Draw, Apply]] = {
    "gaussian_noise": (draw_noise, gaussian_noise),
    "gaussian_blur": (draw_blur, gaussian_blur),
    "brightness": (draw_factors, brightness),
    "contrast": (draw_factors, contrast),
    "low_resolution": (draw_low_resolution, low_resolution),
    "inverted_gamma": (draw_gamma, inverted_gamma),
    "gamma": (draw_gamma, gamma),
}


def draw_intensity(rng: np.random.Generator, augmentation: Augmentation,
                   channels: int) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """The intensity transforms this sample gets, each with its probability, and their parameters."""
    drawn = []
    for name, probability in augmentation.intensity:
        if rng.random() < probability:
            drawn.append((name, INTENSITY[name][0](rng, channels, augmentation.in_plane)))
    return tuple(drawn)


def draw_mirror(rng: np.random.Generator, augmentation: Augmentation) -> tuple[int, ...]:
    """The axes (0 = z) flipped, each with probability `p_mirror`, image and label alike."""
    return tuple(a for a in augmentation.mirror_axes if rng.random() < augmentation.p_mirror)
