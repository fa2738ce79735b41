"""Files of `pipeline.predict`: find and check the input scans, read them, write outputs atomically.

A scan is one 3D NIfTI, one 4D NIfTI whose last axis holds the channels, or (nnU-Net layout)
3D files `<case>_0000.nii.gz`, `<case>_0001.nii.gz`, ... with one channel each; in a folder,
files `<case>_XXXX` are grouped when `<case>_0000` exists. Headers are checked before any
inference (`find_scans`); the voxel data is read, and checked for corruption, per scan.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from pipeline.common.geometry import nifti_channels

NIFTI_ENDINGS = (".nii.gz", ".nii")
AFFINE_TOLERANCE_MM = 1e-3
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


class PredictError(ValueError):
    """A problem with the model, the inputs or the outputs; one line naming the file."""


@dataclass(frozen=True)
class Scan:
    """One input case; `files` hold its channels (a single 3D/4D file, or one 3D file each)."""

    case_id: str
    files: tuple[Path, ...]
    num_channels: int

    @property
    def name(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else f"{self.files[0].parent}/{self.case_id}_XXXX"


def nifti_stem(path: Path) -> str | None:
    """The file name without its NIfTI ending, or None when it is not a NIfTI name."""
    for ending in NIFTI_ENDINGS:
        if path.name.endswith(ending) and len(path.name) > len(ending):
            return path.name[: -len(ending)]
    return None


def find_scans(source: Path) -> list[Scan]:
    """The header-checked scans of a NIfTI file or of the NIfTI files in a folder."""
    if source.is_file():
        if nifti_stem(source) is None:
            raise PredictError(f"{source}: not a NIfTI file (expected .nii or .nii.gz)")
        return [inspect_scan(nifti_stem(source), (source,))]
    if not source.is_dir():
        raise PredictError(f"{source}: no such file or folder")
    groups = group_case_files(p for p in sorted(source.iterdir()) if p.is_file() and not p.name.startswith("."))
    if not groups:
        raise PredictError(f"{source}: no NIfTI files (.nii, .nii.gz) in this folder")
    return [inspect_scan(case_id, files) for case_id, files in groups.items()]


def group_case_files(paths: Iterable[Path]) -> dict[str, tuple[Path, ...]]:
    """Case id -> its files: `<case>_XXXX` channel files grouped when `<case>_0000` exists."""
    stems = {nifti_stem(p): p for p in paths if nifti_stem(p) is not None}
    groups: dict[str, list[Path]] = {}
    for stem, path in sorted(stems.items()):
        match = _CHANNEL_FILE.match(stem)
        case_id = match["case"] if match and f"{match['case']}_0000" in stems else stem
        groups.setdefault(case_id, []).append(path)
    for case_id, files in groups.items():
        if len(files) > 1:
            _check_channel_numbering(case_id, files)
    return {case_id: tuple(files) for case_id, files in groups.items()}


def _check_channel_numbering(case_id: str, files: list[Path]) -> None:
    matches = [_CHANNEL_FILE.match(nifti_stem(f)) for f in files]
    numbers = [int(m["channel"]) if m and m["case"] == case_id else -1 for m in matches]
    if numbers != list(range(len(files))):
        expected = f"0000..{len(files) - 1:04d}"
        raise PredictError(f"{files[0].parent}/{case_id}_XXXX: channel files must be numbered {expected}, got {numbers}")


def inspect_scan(case_id: str, files: tuple[Path, ...]) -> Scan:
    """Check headers (NIfTI, 3D or 4D, channel files on one grid) without reading the voxels."""
    images = [_load_header(f) for f in files]
    shapes = [tuple(image.shape) for image in images]
    if len(files) == 1:
        if len(shapes[0]) not in (3, 4):
            raise PredictError(f"{files[0]}: expected a 3D image or a 4D image (channels last), got shape {shapes[0]}")
        channels = shapes[0][3] if len(shapes[0]) == 4 else 1
        return Scan(case_id, files, channels)
    for path, image, shape in zip(files, images, shapes):
        if shape != shapes[0] or len(shape) != 3:
            raise PredictError(f"{path}: shape {shape} != {files[0].name} {shapes[0]} (channels: 3D files on one grid)")
        if not np.allclose(image.affine, images[0].affine, atol=AFFINE_TOLERANCE_MM):
            raise PredictError(f"{path}: affine differs from {files[0].name} (channel files must share one grid)")
    return Scan(case_id, files, len(files))


def _load_header(path: Path) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
    except _READ_ERRORS as err:
        raise PredictError(f"{path}: not a readable NIfTI file ({_first_line(err)})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise PredictError(f"{path}: not a NIfTI file ({type(image).__name__})")
    return image


def read_scan(scan: Scan) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Voxels (C, x, y, z) float32, the affine and the header of the (first) file."""
    images = [_load_header(path) for path in scan.files]
    try:
        data, affine = nifti_channels(images)
    except _READ_ERRORS as err:
        raise PredictError(f"{scan.name}: corrupt NIfTI data ({_first_line(err)})") from None
    if not np.isfinite(data).all():
        raise PredictError(f"{scan.name}: image holds NaN or infinite values")
    return data, affine, images[0].header


def label_image(labels: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header) -> nib.Nifti1Image:
    """A label NIfTI (uint8, or uint16 for merged maps) on the input's grid, with its qform/sform codes."""
    return _like_input(labels, affine, header, labels.dtype.type)


def probability_image(probabilities: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header) -> nib.Nifti1Image:
    """A float32 4D NIfTI (x, y, z, class) of (class, x, y, z) probabilities."""
    return _like_input(np.moveaxis(probabilities, 0, -1).astype(np.float32), affine, header, np.float32)


def _like_input(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header, dtype: type) -> nib.Nifti1Image:
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.set_qform(affine, code=int(header["qform_code"]) or 1)
    image.set_sform(affine, code=int(header["sform_code"]) or 1)
    image.header.set_xyzt_units(*header.get_xyzt_units())
    image.set_data_dtype(dtype)
    return image


def write_outputs(outputs: Mapping[Path, nib.Nifti1Image | dict[str, Any]]) -> list[Path]:
    """Write NIfTI images and JSON documents: each to a hidden temporary file first, then all
    renamed into place, so no output is ever half-written (temporaries go on failure)."""
    staged: dict[Path, Path] = {}
    try:
        for path, content in outputs.items():
            temporary = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
            staged[path] = temporary
            if isinstance(content, dict):
                temporary.write_text(json.dumps(content, indent=2))
            else:
                nib.save(content, temporary)
        for path, temporary in staged.items():
            os.replace(temporary, path)
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)
    return list(outputs)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
