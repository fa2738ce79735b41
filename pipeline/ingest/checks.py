"""Load one case and validate it (nnU-Net's verify_dataset_integrity, per case, without assert).

Every problem becomes one line "<file>: <what is wrong>"; a case with any problem raises
CaseError holding all of them. An all-background label is only a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.common.geometry import channels_first, volume_problem
from pipeline.ingest.dataset import CaseSource

AFFINE_TOLERANCE_MM = 1e-3


class CaseError(Exception):
    """A case that cannot be ingested; `problems` has one "<file>: <problem>" line each."""

    def __init__(self, problems: list[str] | tuple[str, ...]):
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class LoadedCase:
    """A validated case as read from disk, still in the file's orientation."""

    image: np.ndarray  # (C, x, y, z) float32
    affine: np.ndarray
    label: np.ndarray | None  # (x, y, z) uint8
    warnings: tuple[str, ...] = ()


def load_case(case: CaseSource, num_channels: int, label_ids: set[int]) -> LoadedCase:
    """Read and check a case; raises CaseError listing every problem found."""
    if case.problems:
        raise CaseError(case.problems)
    image, affine, problems = _load_image(case, num_channels)
    label, label_problems, warnings = (None, [], [])
    if case.label is not None and image is not None:
        label, label_problems, warnings = _load_label(case.label, image.shape[1:], affine, label_ids)
    if problems or label_problems:
        raise CaseError(problems + label_problems)
    return LoadedCase(image, affine, label, tuple(warnings))


def _read(path: Path) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """Data and affine of a NIfTI file, or the reason it cannot be read."""
    try:
        nifti = nib.load(path)
        if not isinstance(nifti, nib.Nifti1Image | nib.Nifti2Image):
            return None, None, [f"{path}: not a NIfTI file ({type(nifti).__name__})"]
        return np.asanyarray(nifti.dataobj), nifti.affine, []
    except Exception as err:  # nibabel raises many types for corrupt files (ImageFileError, EOFError, zlib...)
        return None, None, [f"{path}: cannot read NIfTI: {type(err).__name__}: {' '.join(str(err).split())}"]


def _spatial_problems(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> list[str]:
    problem = volume_problem(shape, affine)
    return [f"{path}: {problem}"] if problem else []


def _finite_problems(path: Path, data: np.ndarray) -> list[str]:
    bad = int(np.count_nonzero(~np.isfinite(data))) if np.issubdtype(data.dtype, np.floating) else 0
    return [f"{path}: {bad} NaN/inf voxels"] if bad else []


def _load_image(case: CaseSource, num_channels: int) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    channels, affine, problems = [], None, []
    for path in case.images:
        data, file_affine, file_problems = _read(path)
        if data is not None:
            file_problems = _spatial_problems(path, data.shape, file_affine) + _finite_problems(path, data)
            if data.ndim > 4 or (data.ndim == 4 and len(case.images) > 1):
                file_problems.append(f"{path}: image of shape {data.shape}; expected 3D per channel file")
            elif channels and (data.shape[:3] != channels[0].shape[1:] or not _same_affine(file_affine, affine)):
                file_problems.append(f"{path}: shape {data.shape} or affine differ from {case.images[0].name}")
        problems += file_problems
        if not file_problems:
            channels.append(channels_first(data))
            affine = file_affine if affine is None else affine
    if problems:
        return None, None, problems
    image = np.concatenate(channels).astype(np.float32)
    if image.shape[0] != num_channels:
        return None, None, [f"{case.images[0]}: {image.shape[0]} channels, dataset.json declares {num_channels}"]
    return image, affine, []


def _load_label(
    path: Path, shape: tuple[int, ...], affine: np.ndarray, label_ids: set[int]
) -> tuple[np.ndarray | None, list[str], list[str]]:
    data, label_affine, problems = _read(path)
    if data is None:
        return None, problems, []
    if data.shape != tuple(shape):
        problems.append(f"{path}: shape {data.shape} != image {tuple(shape)}")
    elif not _same_affine(label_affine, affine):
        problems.append(f"{path}: affine differs from the image's (max difference "
                        f"{np.abs(label_affine - affine).max():.4g} mm)")
    problems += _finite_problems(path, data)
    if problems:
        return None, problems, []
    values = np.unique(data)
    if not np.array_equal(values, np.round(values)):
        return None, [f"{path}: label values are not integers (e.g. {values[values != np.round(values)][:3]})"], []
    undeclared = sorted(set(values.astype(np.int64).tolist()) - label_ids)
    if undeclared:
        declared = sorted(label_ids)
        return None, [f"{path}: label values {undeclared} not declared in dataset.json (declared {declared})"], []
    warnings = [f"{path}: label is all background"] if values.max() == 0 else []
    return data.astype(np.uint8), [], warnings


def _same_affine(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, atol=AFFINE_TOLERANCE_MM, rtol=0))
