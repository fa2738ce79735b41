"""The Zarr task store: its layout (a versioned contract) and the reader training uses (its
arrays' windows are read by `pipeline.common.store_read`).

One store per dataset, a Zarr v3 group at `<ROOT>/<dataset>.zarr`, local or any fsspec URL:

    zarr.json                 root attrs: "format_version", "plan" (ingest's resume cache) and
                              "manifest" (StoreManifest.to_dict()), written last, atomically
    cases/<case_id>/image     (C, z, y, x) float32, normalised, canonical RAS voxel order,
                              resampled to the target spacing
    cases/<case_id>/label     (z, y, x) uint8; absent for test (imagesTs) cases
    cases/<case_id>/class_locations
                              (N, 4) int32 rows (class, z, y, x), sorted by class: a capped
                              random sample of the voxels of each foreground class; absent
                              for test cases
    cases/<case_id> attrs     "meta" (geometry.CaseMeta.to_dict()), "spacing" (z, y, x),
                              "source", "source_fingerprint" (content hash), "source_stat"
                              (names, sizes, mtimes), "recipe", "warnings", "empty_arrays"
                              (arrays all zero, so without a shard), and "complete": true,
                              written last; a case without it is not a case.

Image and label are each one shard (`sharding_indexed`, index at the start) holding the whole
volume in chunks of the ingest's chunk size (full channel depth for the image), Blosc inside
(LZ4 for images, LZ4HC for labels), then a CRC32C per chunk (the `crc32c` codec): a patch read
decodes only the chunks it touches, from one object per array, and checks each one's checksum.
Chunks equal to the fill value are not written (nor is an all-zero shard: the case's
"empty_arrays" lists such arrays, so that a shard missing from any other is an error).

A store without a manifest is an unfinished ingest and does not open. The root attrs and the
manifest both carry the format version; every reader checks both. Older stores (1: plain 64^3
chunks; 2: no per-chunk checksums) are refused: re-ingest them with --overwrite. The manifest
records the cases the last ingest could not write (`failed`), the stored cases it kept
although their source now fails or is missing (`stale`) and, when a later ingest of the source
failed as a whole (dataset.json invalid, the folder gone), when and why (`last_ingest_failed`;
the cases are the earlier ingest's); such a store opens with a warning, and training refuses it
unless told (`data.allow_incomplete_stores`). A successful ingest writes a manifest without them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
import zarr.storage

from model.tasks import ClassesAndChannels
from pipeline.common.geometry import CaseMeta
from pipeline.common.intensity import ChannelNormalization
from pipeline.common.store_read import (
    REINGEST_HINT, ArrayReader, ByteRanges, ShardReader, StoreError, ZarrReader, zarr_read,
)

FORMAT_VERSION = 3
FORMAT_VERSION_KEY = "format_version"
CASES = "cases"
IMAGE = "image"
LABEL = "label"
CLASS_LOCATIONS = "class_locations"
MANIFEST = "manifest"
COMPLETE = "complete"
EMPTY_ARRAYS = "empty_arrays"
SPLITS = ("train", "validation", "test", "all")
log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StoreManifest(ClassesAndChannels):
    """What a store holds; everything training and prediction need besides the arrays."""

    task_name: str
    modalities: tuple[str, ...]
    labels: dict[int, str]  # class id -> name, background included
    target_spacing: tuple[float, float, float]  # (z, y, x) mm
    normalization: tuple[ChannelNormalization, ...]  # one per channel
    cases: dict[str, str]  # case id -> source fingerprint, every case in the store
    split: dict[str, list[str]]  # {"train": [...], "validation": [...]}, labelled cases; fold 0 held out
    test_cases: tuple[str, ...] = ()  # imagesTs cases (with a label when labelsTs had one)
    image_order: int = 3
    label_resampling: str = "nearest"
    dataset: str = ""  # source folder name, the store's name
    source_root: str = ""  # absolute path of the source folder at ingest time (case attrs "source" are relative)
    failed: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # not in the store: id -> problems
    stale: dict[str, str] = dataclasses.field(default_factory=dict)  # kept from an earlier ingest: id -> why
    format_version: int = FORMAT_VERSION
    folds: list[list[str]] = dataclasses.field(default_factory=list)  # held-out cases per fold (ingest.split)
    # {"at": ISO 8601 UTC time, "reason": one line} when the last ingest of the source failed as a whole
    last_ingest_failed: dict[str, str] = dataclasses.field(default_factory=dict)

    def with_fold(self, fold: int) -> StoreManifest:
        """This manifest with `folds[fold]` as the validation split and the other labelled cases as
        the train split; a store with fewer folds holds nothing out there (all its cases train)."""
        if fold < 0:
            raise ValueError(f"fold must be >= 0, got {fold}")
        labelled = sorted(self.split["train"] + self.split["validation"])
        held_out = set(self.folds[fold]) if fold < len(self.folds) else set()
        return dataclasses.replace(
            self, split={"train": [c for c in labelled if c not in held_out], "validation": sorted(held_out)}
        )

    def incomplete(self) -> str | None:
        """Why the last ingest did not end cleanly (it failed as a whole; failed or stale cases), or None."""
        parts = [f"{len(cases)} {kind} case(s) ({', '.join(sorted(cases)[:5])}{', ...' if len(cases) > 5 else ''})"
                 for kind, cases in (("failed", self.failed), ("stale", self.stale)) if cases]
        if self.last_ingest_failed:
            parts.insert(0, f"it failed at {self.last_ingest_failed['at']} ({self.last_ingest_failed['reason']}), "
                            "the cases are those of an earlier ingest")
        return "its last ingest did not finish cleanly: " + ", ".join(parts) if parts else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists, string keys), equal to what the store's attrs read back."""
        raw = dataclasses.asdict(self)
        raw["labels"] = {str(k): v for k, v in self.labels.items()}
        raw["normalization"] = [n.to_dict() for n in self.normalization]
        return json.loads(json.dumps(raw))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StoreManifest:
        return cls(
            task_name=raw["task_name"],
            modalities=tuple(raw["modalities"]),
            labels={int(k): v for k, v in raw["labels"].items()},
            target_spacing=tuple(raw["target_spacing"]),
            normalization=tuple(ChannelNormalization.from_dict(n) for n in raw["normalization"]),
            cases=dict(raw["cases"]),
            split={k: list(v) for k, v in raw["split"].items()},
            test_cases=tuple(raw["test_cases"]),
            image_order=raw["image_order"],
            label_resampling=raw["label_resampling"],
            dataset=raw["dataset"],
            source_root=raw["source_root"],
            failed={k: list(v) for k, v in raw["failed"].items()},
            stale=dict(raw["stale"]),
            format_version=raw["format_version"],
            folds=[list(f) for f in raw.get("folds", [])],
            last_ingest_failed=dict(raw.get("last_ingest_failed", {})),
        )


def open_group(uri: str, storage_options: dict[str, Any] | None = None, mode: str = "r") -> zarr.Group:
    """The store's root group; `uri` is a local path or an fsspec URL such as s3://bucket/x.zarr."""
    read_only = mode == "r"
    if "://" in uri:
        store = zarr.storage.FsspecStore.from_url(uri, storage_options=storage_options, read_only=read_only)
    else:
        store = zarr.storage.LocalStore(uri, read_only=read_only)
    return zarr.open_group(store, mode=mode, zarr_format=3)


def check_format_version(uri: str, version: Any, where: str) -> None:
    """Raise StoreError (with the re-ingest hint) unless `version` is this code's FORMAT_VERSION."""
    if version != FORMAT_VERSION:
        raise StoreError(f"{uri}: store format version {version} ({where}) is not supported (this code reads "
                         f"{FORMAT_VERSION}); {REINGEST_HINT}")


@dataclass(frozen=True)
class _Case:
    group: zarr.Group
    image: ArrayReader
    label: ArrayReader | None


class TaskStore:
    """Reads one task store: whole cases, patches, and nnU-Net style foreground-biased samples.

    Patches are read chunk-wise, so volumes are never loaded whole. A case is opened once (its
    group, array layouts and shard indexes are kept); after that a patch reads and decodes just
    the chunks it touches, bypassing zarr-python's per-read and per-chunk machinery (~0.7 and
    ~0.5 ms on 2 cores, most of a version 1 read). Picklable (for data loader workers): handles
    are reopened lazily after unpickling.
    """

    def __init__(self, uri: str, manifest: StoreManifest, storage_options: dict[str, Any] | None = None):
        self.uri = uri
        self.manifest = manifest
        self.storage_options = storage_options
        self._root: zarr.Group | None = None
        self._data: ByteRanges | None = None
        self._cases: dict[str, _Case] = {}
        self._locations: dict[str, dict[int, np.ndarray]] = {}

    @classmethod
    def open(
        cls, uri: str, storage_options: dict[str, Any] | None = None, allow_incomplete: bool = True,
        fold: int | None = None,
    ) -> TaskStore:
        """Open a finished store; raises StoreError when it is missing, unfinished or of another
        format version. A store whose last ingest failed (as a whole: `last_ingest_failed`) or left
        failed or stale cases opens with a warning, or raises when `allow_incomplete` is False
        (training's default). With `fold`, that cross-validation fold is the validation split
        (`StoreManifest.with_fold`)."""
        try:
            root = open_group(uri, storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as err:
            raise StoreError(f"{uri}: not a Zarr group ({err})") from None
        check_format_version(uri, root.attrs.get(FORMAT_VERSION_KEY), "root attribute format_version")
        raw = root.attrs.get(MANIFEST)
        if raw is None:
            raise StoreError(f"{uri}: no manifest: not a task store, or its ingest has not finished")
        check_format_version(uri, raw.get(FORMAT_VERSION_KEY), "manifest format_version")
        manifest = StoreManifest.from_dict(raw)
        store = cls(uri, manifest if fold is None else manifest.with_fold(fold), storage_options)
        incomplete = store.manifest.incomplete()
        if incomplete is not None and not allow_incomplete:
            raise StoreError(f"{uri}: {incomplete}; fix the sources and re-run pipeline.ingest, or set "
                             "data.allow_incomplete_stores: true to use it as it is")
        if incomplete is not None:
            log.warning("%s: %s; re-run pipeline.ingest", uri, incomplete)
        store._root = root
        return store

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "manifest": self.manifest.to_dict(), "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], StoreManifest.from_dict(state["manifest"]), state["storage_options"])

    def case_ids(self, split: str = "all") -> list[str]:
        """Sorted case ids of "train", "validation", "test" (no labels) or "all"."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "all":
            return sorted(self.manifest.cases)
        if split == "test":
            return sorted(self.manifest.test_cases)
        return sorted(self.manifest.split[split])

    def case_meta(self, case_id: str) -> CaseMeta:
        """Geometry to map this case's (z, y, x) arrays back to its source file."""
        return CaseMeta.from_dict(self._case(case_id).group.attrs["meta"])

    def case_sources(self, case_id: str) -> list[str]:
        """The case's source files (images, then label if any), relative to `manifest.source_root`."""
        return list(self._case(case_id).group.attrs["source"])

    def class_locations(self, case_id: str) -> dict[int, np.ndarray]:
        """Per foreground class, an (N, 3) int array of stored (z, y, x) voxel indices (N may be 0);
        empty for a test case."""
        if case_id not in self._locations:
            case = self._case(case_id)
            locations: dict[int, np.ndarray] = {}
            if case.label is not None:
                rows = zarr_read(case.group[CLASS_LOCATIONS], ..., self._where(case_id, CLASS_LOCATIONS))
                bounds = np.searchsorted(rows[:, 0], np.arange(1, self.manifest.num_classes + 1))
                locations = {c: rows[bounds[c - 1]:bounds[c], 1:] for c in range(1, self.manifest.num_classes)}
            self._locations[case_id] = locations
        return self._locations[case_id]

    def read_case(self, case_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The whole image (C, z, y, x) and label (z, y, x), or None for a test case."""
        case = self._case(case_id)
        return self._read(case.image), None if case.label is None else self._read(case.label)

    def read_patch(
        self, case_id: str, start: tuple[int, int, int], size: tuple[int, int, int]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image (C, *size) and label (*size) of the window at `start` (z, y, x), which may leave
        the volume: outside voxels are 0 in the image and background in the label."""
        case = self._case(case_id)
        channels, *shape = case.image.shape
        source = tuple(slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(start, size, shape))
        target = tuple(slice(src.start - s, src.stop - s) for src, s in zip(source, start))
        inside = all(src.stop > src.start for src in source)
        new = np.empty if inside and all(t.stop - t.start == n for t, n in zip(target, size)) else np.zeros
        image = new((channels, *size), dtype=np.float32)
        label = None if case.label is None else new(size, dtype=np.uint8)
        if inside:
            case.image.read((slice(0, channels), *source), image[(slice(None), *target)])
            if label is not None:
                case.label.read(source, label[target])
        return image, label

    def sample_patch(
        self,
        rng: np.random.Generator,
        size: tuple[int, int, int],
        force_foreground: bool,
        case_id: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, str]:
        """A random patch of `case_id` (default: a random training case), nnU-Net style.

        With `force_foreground`, a foreground class present in the case is drawn uniformly, then
        one of its stored voxels, and the window is placed so that this voxel lies inside it,
        near its centre (jitter up to a quarter of the patch). Otherwise, or when the case has
        no foreground, the window is uniform over all positions that overlap the volume as
        nnU-Net allows (a patch larger than the volume is padded).
        """
        if case_id is None:
            train = self.case_ids("train")
            if not train:
                raise StoreError(f"{self.uri}: no training cases to sample from")
            case_id = train[int(rng.integers(len(train)))]
        shape = self._case(case_id).image.shape[1:]
        low = [min(0, d - s) for d, s in zip(shape, size)]
        high = [max(0, d - s) for d, s in zip(shape, size)]
        voxel = self._foreground_voxel(rng, case_id) if force_foreground else None
        if voxel is None:
            start = [int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high)]
        else:
            jitter = [int(rng.integers(-(s // 4), s // 4 + 1)) for s in size]
            start = [int(np.clip(v - s // 2 + j, lo, hi)) for v, s, j, lo, hi in zip(voxel, size, jitter, low, high)]
        image, label = self.read_patch(case_id, tuple(start), tuple(size))
        return image, label, case_id

    def _foreground_voxel(self, rng: np.random.Generator, case_id: str) -> np.ndarray | None:
        present = [locs for c, locs in sorted(self.class_locations(case_id).items()) if c > 0 and len(locs)]
        if not present:
            return None
        locations = present[int(rng.integers(len(present)))]
        return locations[int(rng.integers(len(locations)))]

    @staticmethod
    def _read(reader: ArrayReader) -> np.ndarray:
        out = np.empty(reader.shape, dtype=reader.dtype)
        reader.read(tuple(slice(0, n) for n in reader.shape), out)
        return out

    def verify(self) -> list[str]:
        """Read every array of every case, checking each chunk's checksum: one line per array
        that is corrupt or unreadable (empty when the store is sound)."""
        problems = []
        for case_id in self.case_ids():
            try:
                case = self._case(case_id)
            except StoreError as err:
                problems.append(str(err))
                continue
            reads = [functools.partial(self._read, r) for r in (case.image, case.label) if r is not None]
            for read in [*reads, functools.partial(self.class_locations, case_id)]:
                try:
                    read()
                except StoreError as err:
                    problems.append(str(err))
            self._cases.pop(case_id, None)  # one case's readers at a time
            self._locations.pop(case_id, None)
        return problems

    def _where(self, case_id: str, array: str) -> str:
        return f"{self.uri}: case {case_id!r}, array {array!r}"

    def _case(self, case_id: str) -> _Case:
        if case_id not in self._cases:
            if case_id not in self.manifest.cases:
                raise StoreError(f"{self.uri}: no case {case_id!r}")
            if self._root is None:
                self._root = open_group(self.uri, self.storage_options)
            try:
                group = self._root[f"{CASES}/{case_id}"]
            except KeyError:
                raise StoreError(f"{self.uri}: case {case_id!r} is in the manifest but not in the store; "
                                 f"{REINGEST_HINT}") from None
            if group.attrs.get(COMPLETE) is not True:
                raise StoreError(f"{self.uri}: case {case_id!r} is incomplete")
            label, empty = group.get(LABEL), set(group.attrs.get(EMPTY_ARRAYS, ()))
            image = self._reader(group[IMAGE], case_id, IMAGE, IMAGE in empty)
            self._cases[case_id] = _Case(group, image,
                                         None if label is None else self._reader(label, case_id, LABEL, LABEL in empty))
        return self._cases[case_id]

    def _reader(self, array: zarr.Array, case_id: str, name: str, empty: bool) -> ArrayReader:
        where = self._where(case_id, name)
        if not ShardReader.supports(array):
            return ZarrReader(array, where)
        if self._data is None:
            self._data = ByteRanges(self.uri, self.storage_options)
        return ShardReader(array, self._data, where, empty)
