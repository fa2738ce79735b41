"""Read a raw dataset folder: its dataset.json (MSD or nnU-Net v2 form) and the list of cases.

MSD: `modality` {"0": "CT"}, `labels` {"0": "background", ...}, `training` [{"image", "label"}],
optional `test`; an image is one 3D/4D file, or (nnU-Net-converted MSD) one file per channel
named `<case>_0000.nii.gz`. nnU-Net v2: `channel_names`, `labels` {"background": 0, ...},
`file_ending`; cases are found as `imagesTr/<case>_0000<file_ending>`. Both: `imagesTs/` cases
have no labels.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

MSD_ENDING = ".nii.gz"
NIFTI_ENDINGS = (".nii.gz", ".nii")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatasetError(ValueError):
    """A dataset that cannot be ingested at all; the message names the file and the problem."""


@dataclass(frozen=True)
class CaseSource:
    """The files of one case; `problems` are listing errors found before reading (missing files)."""

    case_id: str
    images: tuple[Path, ...]  # one file per channel, or a single 3D/4D file
    label: Path | None  # None for a test case
    is_test: bool = False
    problems: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        return self.images + ((self.label,) if self.label else ())


@dataclass(frozen=True)
class DatasetSpec:
    root: Path
    name: str  # folder name: the store is <name>.zarr
    task_name: str  # dataset.json "name", else the folder name
    layout: Literal["msd", "nnunetv2"]
    modalities: tuple[str, ...]
    labels: dict[int, str]
    file_ending: str
    cases: tuple[CaseSource, ...]

    @property
    def train_cases(self) -> tuple[CaseSource, ...]:
        return tuple(c for c in self.cases if not c.is_test)


def read_dataset(root: Path) -> DatasetSpec:
    """Parse `root/dataset.json` and list the cases; raises DatasetError naming the problem."""
    root = Path(root)
    meta = _read_json(root / "dataset.json")
    layout = "nnunetv2" if "channel_names" in meta else "msd"
    channels_key = "channel_names" if layout == "nnunetv2" else "modality"
    modalities = _modalities(meta, channels_key, root / "dataset.json")
    labels = _labels(meta, layout, root / "dataset.json")
    ending = meta.get("file_ending", MSD_ENDING)
    if ending not in NIFTI_ENDINGS:
        raise DatasetError(f"{root / 'dataset.json'}: file_ending {ending!r} is not supported (NIfTI only)")
    if layout == "msd" and "training" in meta:
        train = [_msd_case(root, entry, len(modalities), ending) for entry in _entries(meta, "training", root)]
    else:
        train = _discover(root, "imagesTr", len(modalities), ending, with_labels=True)
    if layout == "msd" and "test" in meta:
        test = [_msd_test_case(root, entry, len(modalities), ending) for entry in _entries(meta, "test", root)]
    else:
        test = _discover(root, "imagesTs", len(modalities), ending, with_labels=False)
    if not train:
        raise DatasetError(f"{root}: no training cases found (looked in dataset.json and imagesTr/)")
    return DatasetSpec(root, root.name, str(meta.get("name", root.name)), layout, modalities, labels, ending,
                       tuple(train + test))


def source_fingerprint(case: CaseSource) -> str:
    """Hash of the case's file names, sizes and modification times (cheap; no data read)."""
    digest = hashlib.sha256()
    for path in case.files:
        stat = path.stat() if path.exists() else None
        digest.update(f"{path.name}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1};".encode())
    return digest.hexdigest()[:16]


def case_rng(case_id: str) -> np.random.Generator:
    """A random generator fixed by the case id (the same draws on every worker and every run)."""
    return np.random.default_rng(zlib.crc32(case_id.encode()))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: dataset.json not found")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: unreadable dataset.json: {err}") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: dataset.json must hold an object, got {type(meta).__name__}")
    return meta


def _modalities(meta: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    channels = meta.get(key)
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(f"{path}: '{key}' must map channel index to modality, got {channels!r}")
    try:
        ordered = sorted((int(k), str(v)) for k, v in channels.items())
    except ValueError:
        raise DatasetError(f"{path}: '{key}' keys must be channel indices, got {list(channels)}") from None
    if [i for i, _ in ordered] != list(range(len(ordered))):
        raise DatasetError(f"{path}: '{key}' indices must be 0..{len(ordered) - 1}, got {list(channels)}")
    return tuple(name for _, name in ordered)


def _labels(meta: dict[str, Any], layout: str, path: Path) -> dict[int, str]:
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{path}: 'labels' must be a non-empty mapping, got {raw!r}")
    pairs = raw.items() if layout == "msd" else ((v, k) for k, v in raw.items())
    try:
        labels = {int(k): str(v) for k, v in pairs}
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: 'labels' ids must be integers (region-based labels are not supported)") from None
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2 or len(labels) > 256:
        raise DatasetError(f"{path}: label ids must be 0..N-1 with 2 <= N <= 256, got {sorted(labels)}")
    return labels


def _strip(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) else None


def _entries(meta: dict[str, Any], key: str, root: Path) -> list[Any]:
    if not isinstance(meta[key], list):
        raise DatasetError(f"{root / 'dataset.json'}: '{key}' must be a list, got {type(meta[key]).__name__}")
    return meta[key]


def _msd_test_case(root: Path, entry: Any, num_channels: int, ending: str) -> CaseSource:
    if not isinstance(entry, str):
        raise DatasetError(f"{root / 'dataset.json'}: test entry must be an image path, got {entry!r}")
    image = root / entry
    case_id = _strip(image.name, ending) or image.name
    images, problems = _image_files(image, case_id, num_channels, ending)
    return CaseSource(case_id, images, None, True, problems)


def _msd_case(root: Path, entry: Any, num_channels: int, ending: str) -> CaseSource:
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise DatasetError(f"{root / 'dataset.json'}: training entry must hold 'image' and 'label', got {entry!r}")
    image = root / entry["image"]
    case_id = _strip(image.name, ending) or image.name
    label = root / entry["label"]
    images, problems = _image_files(image, case_id, num_channels, ending)
    if not label.is_file():
        problems += (f"{label}: missing label for case {case_id}",)
    return CaseSource(case_id, images, label, False, problems)


def _image_files(
    single: Path, case_id: str, num_channels: int, ending: str
) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    """A single image file if it exists, else the per-channel files `<case>_XXXX<ending>`."""
    if single.is_file():
        return (single,), ()
    channels = tuple(single.parent / f"{case_id}_{c:04d}{ending}" for c in range(num_channels))
    missing = [p for p in channels if not p.is_file()]
    if len(missing) == num_channels:
        return (single,), (f"{single}: missing image (neither it nor {channels[0].name} exists)",)
    return channels, tuple(f"{p}: missing channel file for case {case_id}" for p in missing)


def _discover(root: Path, folder: str, num_channels: int, ending: str, with_labels: bool) -> list[CaseSource]:
    """Cases in `root/folder`: per-channel files grouped by case, or single files."""
    directory = root / folder
    if not directory.is_dir():
        return []
    case_ids = set()
    for path in directory.iterdir():
        stem = _strip(path.name, ending)
        if stem is not None and not path.name.startswith("."):  # skip macOS "._*" files of MSD tars
            match = _CHANNEL_FILE.match(stem)
            case_ids.add(match["case"] if match else stem)
    cases = []
    for case_id in sorted(case_ids):
        images, problems = _image_files(directory / f"{case_id}{ending}", case_id, num_channels, ending)
        label = root / "labelsTr" / f"{case_id}{ending}" if with_labels else None
        if label is not None and not label.is_file():
            problems += (f"{label}: missing label for case {case_id}",)
        cases.append(CaseSource(case_id, images, label, not with_labels, problems))
    return cases
