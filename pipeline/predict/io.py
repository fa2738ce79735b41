"""Files of `pipeline.predict`: find and check the input scans, read them, write outputs atomically.

A scan is one 3D NIfTI, one 4D NIfTI whose last axis holds the channels, or (nnU-Net layout)
3D files `<case>_0000.nii.gz`, `<case>_0001.nii.gz`, ... with one channel each; in a folder,
files `<case>_XXXX` are grouped when `<case>_0000` exists. Headers are checked before any
inference (`find_scans`: a bad scan is set aside with its one-line problem, the others go on);
the voxel data is read, and checked for corruption, per scan.
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

from pipeline.common.geometry import nifti_channels, volume_problem

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


def find_scans(source: Path) -> tuple[list[Scan], list[str]]:
    """The header-checked scans of a NIfTI file or of the NIfTI files in a folder, and one line
    per scan that cannot be predicted (naming its file and the problem)."""
    if source.is_file():
        if nifti_stem(source) is None:
            raise PredictError(f"{source}: not a NIfTI file (expected .nii or .nii.gz)")
        groups = [(nifti_stem(source), (source,))]
    elif source.is_dir():
        groups = group_case_files(p for p in sorted(source.iterdir()) if p.is_file() and not p.name.startswith("."))
        if not groups:
            raise PredictError(f"{source}: no NIfTI files (.nii, .nii.gz) in this folder")
    else:
        raise PredictError(f"{source}: no such file or folder")
    scans, problems = [], []
    for case_id, files in groups:
        try:
            scans.append(inspect_scan(case_id, files))
        except PredictError as err:
            problems.append(str(err))
    return scans, problems


def group_case_files(paths: Iterable[Path]) -> list[tuple[str, tuple[Path, ...]]]:
    """(case id, its files) sorted by case id: `<case>_XXXX` channel files grouped when
    `<case>_0000` exists, any other NIfTI alone. Two files of one name (`a.nii`, `a.nii.gz`) stay
    two entries, so that neither is dropped unseen."""
    named = sorted((stem, p) for p in paths if (stem := nifti_stem(p)) is not None)
    stems = {stem for stem, _ in named}
    channels: dict[str, list[Path]] = {}
    groups = []
    for stem, path in named:
        match = _CHANNEL_FILE.match(stem)
        if match and f"{match['case']}_0000" in stems:
            channels.setdefault(match["case"], []).append(path)
        else:
            groups.append((stem, (path,)))
    return sorted(groups + [(case_id, tuple(files)) for case_id, files in channels.items()])


def _check_channel_numbering(case_id: str, files: tuple[Path, ...]) -> None:
    matches = [_CHANNEL_FILE.match(nifti_stem(f)) for f in files]
    numbers = [int(m["channel"]) if m and m["case"] == case_id else -1 for m in matches]
    if numbers != list(range(len(files))):
        expected = f"0000..{len(files) - 1:04d}"
        raise PredictError(f"{files[0].parent}/{case_id}_XXXX: channel files must be numbered {expected}, got {numbers}")


def inspect_scan(case_id: str, files: tuple[Path, ...]) -> Scan:
    """Check headers (NIfTI, 3D or 4D, a volume, channel files on one grid) without reading the voxels."""
    if len(files) > 1:
        _check_channel_numbering(case_id, files)
    images = [_load_header(f) for f in files]
    shapes = [tuple(image.shape) for image in images]
    problem = volume_problem(shapes[0], images[0].affine)
    if problem:
        raise PredictError(f"{files[0]}: {problem}")
    if len(shapes[0]) > 4:
        raise PredictError(f"{files[0]}: expected a 3D image or a 4D image (channels last), got shape {shapes[0]}")
    if len(files) == 1:
        return Scan(case_id, files, shapes[0][3] if len(shapes[0]) == 4 else 1)
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
