"""Read a raw dataset folder: its dataset.json (MSD, MONAI datalist or nnU-Net v2 form) and the cases.

Channels: `channel_names` (nnU-Net v2), else `modality` (MSD), {"0": "CT"}. Labels: id -> name
({"0": "background"}, MSD) or name -> id ({"background": 0}, nnU-Net), told apart by their keys
and values, whichever layout; region-based labels (lists of ids) are refused.
Cases are listed or found:
- listed: `training` [{"image", "label"}] (MSD; MONAI datalists add keys such as `fold`, which are
  ignored) and `test`, each entry a path (MSD) or {"image"} with an optional "label" (MONAI);
  an image is one 3D/4D file, or (nnU-Net-converted MSD) one file per channel named
  `<case>_0000.nii.gz`;
- found (without the list): `imagesTr/<case>_0000<file_ending>` (or a label in `labelsTr/`, so
  that a case whose image went missing is reported, not forgotten) and `imagesTs/`.
A test case has a label when its entry gives one, or (`split.with_test_labels`) from `labelsTs/`.

dataset.json is checked against a schema (pydantic) before any case is listed or read: every
problem is one line naming dataset.json and the key (`training.3.image: ...`). A case id given
twice (two entries, or two folders) is an error naming both files.
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

MSD_ENDING = ".nii.gz"
NIFTI_ENDINGS = (".nii.gz", ".nii")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatasetError(ValueError):
    """A dataset that cannot be ingested at all; the message names the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _TrainingEntry(_Strict):
    """MSD's {"image", "label"}; a MONAI datalist entry's other keys (`fold`) are ignored."""

    image: str = Field(min_length=1)
    label: str = Field(min_length=1)


class _TestEntry(_Strict):
    """A path (MSD), or {"image"} with an optional "label" (MONAI datalist)."""

    image: str = Field(min_length=1)
    label: str | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, entry: Any) -> Any:
        if isinstance(entry, str):
            return {"image": entry}
        if not isinstance(entry, dict):
            raise PydanticCustomError("test_entry", "Input should be a file path or an object with an 'image' key")
        return entry


class _DatasetJson(_Strict):
    """The keys we read (others are allowed); meanings are checked after this (`_modalities`, `_labels`)."""

    name: str | None = None
    modality: dict[str, str] | None = None  # MSD
    channel_names: dict[str, str] | None = None  # nnU-Net v2
    labels: dict[str, Any]  # id -> name (MSD) or name -> id (nnU-Net v2)
    file_ending: str = MSD_ENDING
    training: list[_TrainingEntry] | None = None
    test: list[_TestEntry] | None = None


@dataclass(frozen=True)
class CaseSource:
    """The files of one case; `problems` are listing errors found before reading (missing files)."""

    case_id: str
    images: tuple[Path, ...]  # one file per channel, or a single 3D/4D file
    label: Path | None  # None for a test case without one
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
    layout: Literal["msd", "nnunetv2"]  # training cases listed in dataset.json (msd) or found in imagesTr/
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
    path = root / "dataset.json"
    meta = _validated(_read_json(path), path)
    channels_key = "channel_names" if meta.channel_names is not None else "modality"
    modalities = _modalities(getattr(meta, channels_key), channels_key, path)
    labels = _labels(meta.labels, path)
    ending = meta.file_ending
    if ending not in NIFTI_ENDINGS:
        raise DatasetError(f"{path}: file_ending {ending!r} is not supported (NIfTI only)")
    if meta.training is not None:
        train = [_listed_case(root, entry, len(modalities), ending, is_test=False) for entry in meta.training]
    else:
        train = _discover(root, "imagesTr", len(modalities), ending, with_labels=True)
    if meta.test is not None:
        test = [_listed_case(root, entry, len(modalities), ending, is_test=True) for entry in meta.test]
    else:
        test = _discover(root, "imagesTs", len(modalities), ending, with_labels=False)
    if not train:
        raise DatasetError(f"{root}: no training cases found (looked in dataset.json and imagesTr/)")
    _check_unique(train + test, path)
    name = root.resolve().name  # `--source .` is named after the folder too
    layout = "msd" if meta.training is not None else "nnunetv2"
    return DatasetSpec(root, name, meta.name or name, layout, modalities, labels, ending, tuple(train + test))


def stat_signature(case: CaseSource) -> str:
    """Hash of the case's file names, sizes and modification times (cheap; no data read): the
    opt-in fast path of change detection (`ingest.change_detection: stat`)."""
    digest = hashlib.sha256()
    for path in case.files:
        stat = path.stat() if path.exists() else None
        digest.update(f"{path.name}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1};".encode())
    return digest.hexdigest()[:16]


def content_fingerprint(case: CaseSource) -> str:
    """Hash of the case's file names and contents: what change detection compares by default."""
    digest = hashlib.sha256()
    for path in case.files:
        try:
            with path.open("rb") as file:
                content = hashlib.file_digest(file, "sha256").hexdigest()
        except OSError:
            content = "unreadable"
        digest.update(f"{path.name}:{content};".encode())
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


def _validated(meta: dict[str, Any], path: Path) -> _DatasetJson:
    """The schema check: one line per problem, naming dataset.json, the key and the value."""
    try:
        return _DatasetJson.model_validate(meta)
    except ValidationError as err:
        lines = [f"{path}: {'.'.join(str(part) for part in e['loc'])}: {e['msg']}"
                 + ("" if e["type"] == "missing" else f" (got {e['input']!r})") for e in err.errors(include_url=False)]
        raise DatasetError("\n".join(lines)) from None


def _check_unique(cases: list[CaseSource], path: Path) -> None:
    """Each case id once: two entries (or two folders) giving one id would overwrite each other."""
    first: dict[str, CaseSource] = {}
    problems = []
    for case in cases:
        if case.case_id in first:
            problems.append(f"{path}: case id {case.case_id!r} given twice: {first[case.case_id].images[0]} "
                            f"and {case.images[0]}")
        first.setdefault(case.case_id, case)
    if problems:
        raise DatasetError("\n".join(problems))


def _modalities(channels: dict[str, str] | None, key: str, path: Path) -> tuple[str, ...]:
    if not channels:
        raise DatasetError(f"{path}: '{key}' must map channel index to modality, got {channels!r}")
    try:
        ordered = sorted((int(k), str(v)) for k, v in channels.items())
    except ValueError:
        raise DatasetError(f"{path}: '{key}' keys must be channel indices, got {list(channels)}") from None
    if [i for i, _ in ordered] != list(range(len(ordered))):
        raise DatasetError(f"{path}: '{key}' indices must be 0..{len(ordered) - 1}, got {list(channels)}")
    return tuple(name for _, name in ordered)


def _labels(raw: dict[str, Any], path: Path) -> dict[int, str]:
    """Label id -> name from `labels` in either form (`_label_pairs`): ids 0..N-1, one per class."""
    if not raw:
        raise DatasetError(f"{path}: 'labels' must be a non-empty mapping, got {raw!r}")
    pairs = _label_pairs(raw, path)
    ids = [i for i, _ in pairs]
    if twice := sorted({i for i in ids if ids.count(i) > 1}):
        raise DatasetError(f"{path}: labels: ids {twice} given to more than one class, got {raw!r}")
    if sorted(ids) != list(range(len(ids))) or len(ids) < 2 or len(ids) > 256:
        raise DatasetError(f"{path}: label ids must be 0..N-1 with 2 <= N <= 256, got {sorted(ids)}")
    return dict(pairs)


def _label_pairs(raw: dict[str, Any], path: Path) -> list[tuple[int, str]]:
    """(id, name) pairs, the form told apart by the keys and values, whatever the layout: name -> id
    when every value is an integer (nnU-Net), id -> name when every key is one (MSD)."""
    regions = [f"{path}: labels.{name}: region-based label {ids!r} is not supported (one integer id per class)"
               for name, ids in raw.items() if isinstance(ids, list)]
    if regions:
        raise DatasetError("\n".join(regions))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
        return [(v, k) for k, v in raw.items()]
    if all(k.isascii() and k.isdigit() and isinstance(v, str) for k, v in raw.items()):
        return [(int(k), v) for k, v in raw.items()]
    raise DatasetError(f'{path}: labels: must map id -> name ({{"0": "background", "1": "liver"}}) or '
                       f'name -> id ({{"background": 0, "liver": 1}}), got {raw!r}')


def _strip(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) else None


def _listed_case(
    root: Path, entry: _TrainingEntry | _TestEntry, num_channels: int, ending: str, is_test: bool
) -> CaseSource:
    """A case listed in dataset.json; its paths are relative to the dataset folder."""
    image = root / entry.image
    case_id = _strip(image.name, ending) or image.name
    images, problems = _image_files(image, case_id, num_channels, ending)
    label = root / entry.label if entry.label is not None else None
    if label is not None and not label.is_file():
        problems += (f"{label}: missing label for case {case_id}",)
    return CaseSource(case_id, images, label, is_test, problems)


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
    case_ids = set()
    for path in _listing(directory):
        stem = _strip(path.name, ending)
        if stem is not None and not path.name.startswith("."):  # skip macOS "._*" files of MSD tars
            match = _CHANNEL_FILE.match(stem)
            case_ids.add(match["case"] if match else stem)
    if with_labels and case_ids:  # a label whose image is gone is a case with a missing image
        case_ids |= {stem for p in _listing(root / "labelsTr") if (stem := _strip(p.name, ending))
                     and not p.name.startswith(".")}
    cases = []
    for case_id in sorted(case_ids):
        images, problems = _image_files(directory / f"{case_id}{ending}", case_id, num_channels, ending)
        label = root / "labelsTr" / f"{case_id}{ending}" if with_labels else None
        if label is not None and not label.is_file():
            problems += (f"{label}: missing label for case {case_id}",)
        cases.append(CaseSource(case_id, images, label, not with_labels, problems))
    return cases


def _listing(directory: Path) -> list[Path]:
    return list(directory.iterdir()) if directory.is_dir() else []
