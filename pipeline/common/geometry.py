"""Per-case spatial preprocessing (reorient, crop, resample) and its inverse.

Axis conventions, in one place:
- NIfTI voxel arrays are indexed (x, y, z) in the file's own orientation; multi-channel data
  enters here channels first as (C, x, y, z).
- After `to_canonical` arrays are (C, z, y, x) / (z, y, x): first reoriented to RAS+ voxel
  order (nibabel's closest canonical: x grows towards Right, y Anterior, z Superior), then
  the spatial axes reversed so that index [z, y, x] reads slices first.
  Spacings and shapes after that point are (z, y, x) too.

`preprocess_case` / `preprocess_image` are the exact steps ingest applies; `restore_array` /
`restore_label` undo them (resample back, pad the crop box, undo the reorientation) so a
prediction lands on the original file's voxel grid with its affine. `restore_probabilities`
is how predictions go back, as nnU-Net does it: the class probabilities are resampled (linear),
not the label map, and the labels are their argmax on the original grid.

Resampling follows nnU-Net's anisotropy rule: when the source or the target spacing has a
largest / smallest ratio above 3 and one axis alone is the coarsest, that axis is resampled
separately, by nearest neighbour (order 0), after the other two with the usual order (3 for
images, 1 for probabilities), so that thick slices are not blurred into each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

from pipeline.common.intensity import ChannelNormalization, normalize

Vec3 = tuple[float, float, float]
Shape3 = tuple[int, int, int]
LabelResampling = Literal["nearest", "per-class-linear"]
CANONICAL = orientations.axcodes2ornt(("R", "A", "S"))
ANISOTROPY_THRESHOLD = 3.0
SINGULAR_AFFINE = 1e-6  # |det| of the affine's unit-length voxel axes below this: singular


@dataclass(frozen=True)
class CaseMeta:
    """Everything needed to map a stored (z, y, x) volume back to its source NIfTI grid."""

    original_affine: tuple[tuple[float, float, float, float], ...]
    original_shape: Shape3  # (x, y, z) as in the file
    original_axcodes: tuple[str, str, str]  # e.g. ("L", "P", "S")
    original_spacing: Vec3  # (z, y, x) in canonical order
    canonical_shape: Shape3  # (z, y, x) after reorientation, before cropping
    crop_box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (start, stop) per z, y, x
    spacing: Vec3  # (z, y, x) of the stored volume
    shape: Shape3  # (z, y, x) of the stored volume

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CaseMeta:
        return cls(**{f.name: _as_tuple(raw[f.name]) for f in dataclasses.fields(cls)})

    @property
    def affine(self) -> np.ndarray:
        return np.array(self.original_affine, dtype=np.float64)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def volume_problem(shape: Sequence[int], affine: np.ndarray) -> str | None:
    """Why a NIfTI of `shape` ((x, y, z) or (x, y, z, C)) and `affine` is not a 3D volume in
    millimetres, or None when it is: each spatial axis needs 2 voxels or more, and the affine must
    be finite and invertible (ingest and predict both refuse such images)."""
    if len(shape) < 3 or min(shape[:3]) < 2:
        return f"2D image of shape {tuple(shape)}; 3D volumes are required"
    return _affine_problem(np.asarray(affine, dtype=np.float64))


def _affine_problem(affine: np.ndarray) -> str | None:
    """A non-finite affine, or one whose voxel axes are zero or (nearly) parallel: no spacing, no
    orientation, nothing to resample to."""
    if not np.isfinite(affine).all():
        return "affine holds NaN or infinite values; the header's sform/qform must map voxels to millimetres"
    sizes = nib.affines.voxel_sizes(affine)
    if sizes.min() <= 0 or abs(np.linalg.det(affine[:3, :3] / sizes)) < SINGULAR_AFFINE:
        shown = ", ".join(f"{s:.4g}" for s in sizes)
        return (f"singular affine (voxel sizes {shown} mm, axes not independent); the header's sform/qform "
                "must map voxels to millimetres")
    return None


def channels_first(data: np.ndarray) -> np.ndarray:
    """A NIfTI data array (x, y, z) or (x, y, z, C) as (C, x, y, z)."""
    if data.ndim == 3:
        return data[np.newaxis]
    if data.ndim == 4:
        return np.moveaxis(data, -1, 0)
    raise ValueError(f"expected a 3D or 4D image, got shape {data.shape}")


def nifti_channels(images: Sequence[nib.spatialimages.SpatialImage]) -> tuple[np.ndarray, np.ndarray]:
    """(C, x, y, z) float32 data and the affine of one 3D/4D image or of one 3D image per channel.

    Raises ValueError when the channel images differ in shape or affine.
    """
    first = images[0]
    for other in images[1:]:
        if other.shape != first.shape or not np.allclose(other.affine, first.affine, atol=1e-3):
            raise ValueError(f"channel images differ: shape {other.shape} vs {first.shape} or affine")
    data = np.concatenate([channels_first(np.asanyarray(image.dataobj)) for image in images])
    return data.astype(np.float32), first.affine


def spacing_zyx(affine: np.ndarray) -> Vec3:
    """Voxel sizes of the canonical (z, y, x) grid for a file with this affine."""
    to_ras = orientations.ornt_transform(orientations.io_orientation(affine), CANONICAL)
    sizes = nib.affines.voxel_sizes(affine)
    ras_sizes = [sizes[int(axis)] for axis in np.argsort(to_ras[:, 0])]
    return tuple(float(s) for s in reversed(ras_sizes))


def to_canonical(image_cxyz: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(C, x, y, z) in the file's orientation -> (C, z, y, x) in RAS+ voxel order."""
    to_ras = orientations.ornt_transform(orientations.io_orientation(affine), CANONICAL)
    return np.stack([orientations.apply_orientation(c, to_ras).transpose(2, 1, 0) for c in image_cxyz])


def from_canonical(volume_zyx: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of `to_canonical` for one (z, y, x) volume: back to the file's (x, y, z)."""
    from_ras = orientations.ornt_transform(CANONICAL, orientations.io_orientation(affine))
    return orientations.apply_orientation(volume_zyx.transpose(2, 1, 0), from_ras)


def nonzero_mask(image_czyx: np.ndarray) -> np.ndarray:
    """Voxels where any channel is nonzero, holes filled (nnU-Net's crop mask)."""
    return ndimage.binary_fill_holes(np.any(image_czyx != 0, axis=0))


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(start, stop) per axis of the True voxels; the whole array when there are none."""
    if not mask.any():
        return tuple((0, n) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def crop(volume: np.ndarray, box: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Crop the last len(box) axes of `volume` to `box`."""
    spatial = tuple(slice(start, stop) for start, stop in box)
    return volume[(Ellipsis, *spatial)]


def resampled_shape(shape: Shape3, spacing: Vec3, target_spacing: Vec3) -> Shape3:
    """Shape covering the same extent at `target_spacing` (at least one voxel per axis)."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing))


def separate_axis(current: Sequence[float], new: Sequence[float]) -> int | None:
    """nnU-Net's separate-z rule: the axis resampled on its own (by nearest neighbour) when the
    current, else the new, spacing is anisotropic (max / min > 3) with a single coarsest axis."""
    for spacing in (np.asarray(current, dtype=np.float64), np.asarray(new, dtype=np.float64)):
        if spacing.max() / spacing.min() > ANISOTROPY_THRESHOLD:
            coarsest = np.flatnonzero(spacing == spacing.max())
            return int(coarsest[0]) if len(coarsest) == 1 else None
    return None


def _zoom(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    if tuple(volume.shape) == tuple(shape):
        return volume
    factors = np.array(shape) / np.array(volume.shape)
    out = ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(shape):
        raise RuntimeError(f"resampling gave shape {out.shape}, expected {tuple(shape)}")
    return out


def resize(volume: np.ndarray, shape: Shape3, order: int, axis: int | None = None) -> np.ndarray:
    """Spline-resample one (z, y, x) volume to `shape`; voxel boxes align at the volume edges.

    With `axis` (see `separate_axis`) the other two axes are resampled with `order` first and
    `axis` afterwards by nearest neighbour.
    """
    if tuple(volume.shape) == tuple(shape):
        return volume.copy()
    if axis is None:
        return _zoom(volume, shape, order)
    in_plane = list(shape)
    in_plane[axis] = volume.shape[axis]
    return _zoom(_zoom(volume, in_plane, order), shape, 0)


def resample_image(image_czyx: np.ndarray, shape: Shape3, order: int, axis: int | None = None) -> np.ndarray:
    return np.stack([resize(channel, shape, order, axis).astype(np.float32) for channel in image_czyx])


def resample_label(
    label_zyx: np.ndarray, shape: Shape3, mode: LabelResampling = "nearest", axis: int | None = None
) -> np.ndarray:
    """Nearest neighbour, or nnU-Net's per-class linear (each class mask resampled linearly, argmax)."""
    if mode == "nearest" or tuple(label_zyx.shape) == tuple(shape):
        return resize(label_zyx, shape, order=0)
    classes = np.unique(label_zyx)
    scores = np.stack([resize((label_zyx == c).astype(np.float32), shape, 1, axis) for c in classes])
    return classes[np.argmax(scores, axis=0)].astype(label_zyx.dtype)


def preprocess_case(
    image_cxyz: np.ndarray,
    affine: np.ndarray,
    label_xyz: np.ndarray | None,
    target_spacing: Vec3,
    normalization: tuple[ChannelNormalization, ...],
    image_order: int = 3,
    label_resampling: LabelResampling = "nearest",
) -> tuple[np.ndarray, np.ndarray | None, CaseMeta]:
    """Reorient, crop to the nonzero box, normalise, resample; returns image (C,z,y,x) float32,
    label (z,y,x) uint8 or None, and the metadata to undo it."""
    canonical = to_canonical(image_cxyz, affine)
    mask = nonzero_mask(canonical)
    box = bounding_box(mask)
    image = normalize(crop(canonical, box), normalization, crop(mask, box))
    spacing = spacing_zyx(affine)
    shape = resampled_shape(image.shape[1:], spacing, target_spacing)
    meta = CaseMeta(
        original_affine=tuple(tuple(float(v) for v in row) for row in affine),
        original_shape=tuple(int(n) for n in image_cxyz.shape[1:]),
        original_axcodes=tuple(orientations.aff2axcodes(affine)),
        original_spacing=spacing,
        canonical_shape=tuple(int(n) for n in canonical.shape[1:]),
        crop_box=box,
        spacing=tuple(float(t) for t in target_spacing),
        shape=shape,
    )
    axis = separate_axis(spacing, target_spacing)
    image = resample_image(image, shape, image_order, axis)
    if label_xyz is None:
        return image, None, meta
    label = crop(to_canonical(label_xyz[np.newaxis], affine)[0], box).astype(np.uint8)
    return image, resample_label(label, shape, label_resampling, axis), meta


def preprocess_image(
    image_cxyz: np.ndarray,
    affine: np.ndarray,
    target_spacing: Vec3,
    normalization: tuple[ChannelNormalization, ...],
    image_order: int = 3,
) -> tuple[np.ndarray, CaseMeta]:
    """The ingest steps for an image without a label (prediction on a raw file)."""
    image, _, meta = preprocess_case(image_cxyz, affine, None, target_spacing, normalization, image_order)
    return image, meta


def restore_array(volume_zyx: np.ndarray, meta: CaseMeta, order: int = 0, fill: float = 0) -> np.ndarray:
    """A stored-grid (z, y, x) volume on the original file's (x, y, z) grid.

    Resamples back to the crop box (spline `order`, 0 for labels), pads the box with `fill`,
    and undoes the reorientation. Predictions go back with `restore_probabilities` instead.
    """
    if tuple(volume_zyx.shape) != tuple(meta.shape):
        raise ValueError(f"volume shape {volume_zyx.shape} != stored case shape {meta.shape}")
    box_shape = tuple(stop - start for start, stop in meta.crop_box)
    full = np.full(meta.canonical_shape, fill, dtype=volume_zyx.dtype)
    full[tuple(slice(start, stop) for start, stop in meta.crop_box)] = resize(volume_zyx, box_shape, order)
    return from_canonical(full, meta.affine)


def restore_probabilities(
    probabilities: np.ndarray, meta: CaseMeta, keep: Sequence[int] = (), dtype: type = np.float32
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Stored-grid class probabilities (K, z, y, x) back on the original file's (x, y, z) grid.

    Returns the labels (argmax of the resampled probabilities; background outside the crop box)
    and, for each class in `keep`, its resampled probability map in `dtype` (1 for background,
    0 for the others outside the box). Probabilities are resampled linearly with nnU-Net's
    separate-z rule, one class at a time, so memory holds one class volume in float32 plus the
    running maximum, however many classes there are.
    """
    if tuple(probabilities.shape[1:]) != tuple(meta.shape):
        raise ValueError(f"probabilities shape {probabilities.shape[1:]} != stored case shape {meta.shape}")
    box_shape = tuple(stop - start for start, stop in meta.crop_box)
    box = tuple(slice(start, stop) for start, stop in meta.crop_box)
    axis = separate_axis(meta.spacing, meta.original_spacing)
    best = np.full(box_shape, -np.inf, dtype=np.float32)
    labels = np.zeros(box_shape, dtype=np.uint8)
    kept: dict[int, np.ndarray] = {}
    for c in range(probabilities.shape[0]):
        restored = resize(np.asarray(probabilities[c], dtype=np.float32), box_shape, 1, axis)
        better = restored > best
        labels[better] = c
        np.maximum(best, restored, out=best)
        if c in keep:
            full = np.full(meta.canonical_shape, 1.0 if c == 0 else 0.0, dtype=dtype)
            full[box] = restored
            kept[c] = from_canonical(full, meta.affine)
    full_labels = np.zeros(meta.canonical_shape, dtype=np.uint8)
    full_labels[box] = labels
    return from_canonical(full_labels, meta.affine), kept


def restore_label(label_zyx: np.ndarray, meta: CaseMeta) -> nib.Nifti1Image:
    """A stored-grid label map as a NIfTI on the original file's grid and affine."""
    data = restore_array(label_zyx.astype(np.uint8), meta, order=0, fill=0)
    image = nib.Nifti1Image(np.ascontiguousarray(data), meta.affine)
    image.set_data_dtype(np.uint8)
    return image
