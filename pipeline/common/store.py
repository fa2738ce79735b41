"""The Zarr task store: its layout (a versioned contract) and the reader training uses.

One store per dataset, a Zarr v3 group at `<ROOT>/<dataset>.zarr`, local or any fsspec URL:

    zarr.json                 root attrs: "format_version", "plan" (ingest's resume cache) and
                              "manifest" (StoreManifest.to_dict()), written last, atomically
    cases/<case_id>/image     (C, z, y, x) float32, normalised, canonical RAS voxel order,
                              resampled to the target spacing
    cases/<case_id>/label     (z, y, x) uint8; absent for test (imagesTs) cases
    cases/<case_id> attrs     "meta" (geometry.CaseMeta.to_dict()), "spacing" (z, y, x),
                              "class_locations" ({"<class>": [[z, y, x], ...]}: a capped random
                              sample of the voxels of each foreground class), "source",
                              "source_fingerprint", "recipe", "warnings", and "complete": true,
                              written last; a case without it is not a case.

A store without a manifest is an unfinished ingest and does not open.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
import zarr.storage

from pipeline.common.geometry import CaseMeta
from pipeline.common.intensity import ChannelNormalization

FORMAT_VERSION = 1
CASES = "cases"
IMAGE = "image"
LABEL = "label"
MANIFEST = "manifest"
COMPLETE = "complete"
SPLITS = ("train", "validation", "test", "all")


class StoreError(ValueError):
    """A store that cannot be read; the message names the store and the problem."""


@dataclass(frozen=True)
class StoreManifest:
    """What a store holds; everything training and prediction need besides the arrays."""

    task_name: str
    modalities: tuple[str, ...]
    labels: dict[int, str]  # class id -> name, background included
    target_spacing: tuple[float, float, float]  # (z, y, x) mm
    normalization: tuple[ChannelNormalization, ...]  # one per channel
    cases: dict[str, str]  # case id -> source fingerprint, every case in the store
    split: dict[str, list[str]]  # {"train": [...], "validation": [...]}, labelled cases
    test_cases: tuple[str, ...] = ()  # imagesTs cases, no label
    image_order: int = 3
    label_resampling: str = "nearest"
    dataset: str = ""  # source folder name, the store's name
    source_root: str = ""  # absolute path of the source folder at ingest time (case attrs "source" are relative)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        return len(self.modalities)

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
            format_version=raw["format_version"],
        )


def open_group(uri: str, storage_options: dict[str, Any] | None = None, mode: str = "r") -> zarr.Group:
    """The store's root group; `uri` is a local path or an fsspec URL such as s3://bucket/x.zarr."""
    read_only = mode == "r"
    if "://" in uri:
        store = zarr.storage.FsspecStore.from_url(uri, storage_options=storage_options, read_only=read_only)
    else:
        store = zarr.storage.LocalStore(uri, read_only=read_only)
    return zarr.open_group(store, mode=mode, zarr_format=3)


class TaskStore:
    """Reads one task store: whole cases, patches, and nnU-Net style foreground-biased samples.

    Patches are read chunk-wise, so volumes are never loaded whole. Picklable (for data loader
    workers): the Zarr handles are reopened lazily after unpickling.
    """

    def __init__(self, uri: str, manifest: StoreManifest, storage_options: dict[str, Any] | None = None):
        self.uri = uri
        self.manifest = manifest
        self.storage_options = storage_options
        self._root: zarr.Group | None = None
        self._cases: dict[str, zarr.Group] = {}
        self._array_cache: dict[str, tuple[zarr.Array, zarr.Array | None]] = {}
        self._locations: dict[str, dict[int, np.ndarray]] = {}

    @classmethod
    def open(cls, uri: str, storage_options: dict[str, Any] | None = None) -> TaskStore:
        """Open a finished store; raises StoreError when it is missing, unfinished or too new."""
        try:
            root = open_group(uri, storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as err:
            raise StoreError(f"{uri}: not a Zarr group ({err})") from None
        raw = root.attrs.get(MANIFEST)
        if raw is None:
            raise StoreError(f"{uri}: no manifest: not a task store, or its ingest has not finished")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{uri}: store format version {version} is not supported (this code reads "
                             f"{FORMAT_VERSION})")
        store = cls(uri, StoreManifest.from_dict(raw), storage_options)
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
        return CaseMeta.from_dict(self._case(case_id).attrs["meta"])

    def class_locations(self, case_id: str) -> dict[int, np.ndarray]:
        """Per foreground class, an (N, 3) int array of stored (z, y, x) voxel indices (N may be 0)."""
        if case_id not in self._locations:
            raw = self._case(case_id).attrs["class_locations"]
            self._locations[case_id] = {int(c): np.asarray(v, dtype=np.int64).reshape(-1, 3) for c, v in raw.items()}
        return self._locations[case_id]

    def read_case(self, case_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The whole image (C, z, y, x) and label (z, y, x), or None for a test case."""
        image, label = self._arrays(case_id)
        return image[...], None if label is None else label[...]

    def read_patch(
        self, case_id: str, start: tuple[int, int, int], size: tuple[int, int, int]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image (C, *size) and label (*size) of the window at `start` (z, y, x), which may leave
        the volume: outside voxels are 0 in the image and background in the label."""
        image_array, label_array = self._arrays(case_id)
        shape = image_array.shape[1:]
        source = tuple(slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(start, size, shape))
        target = tuple(slice(src.start - s, src.stop - s) for src, s in zip(source, start))
        image = np.zeros((image_array.shape[0], *size), dtype=np.float32)
        label = None if label_array is None else np.zeros(size, dtype=np.uint8)
        if all(src.stop > src.start for src in source):
            image[(slice(None), *target)] = image_array[(slice(None), *source)]
            if label is not None:
                label[target] = label_array[source]
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
        shape = self._arrays(case_id)[0].shape[1:]
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

    def _arrays(self, case_id: str) -> tuple[zarr.Array, zarr.Array | None]:
        if case_id not in self._array_cache:
            group = self._case(case_id)
            arrays = dict(group.arrays())
            self._array_cache[case_id] = (arrays[IMAGE], arrays.get(LABEL))
        return self._array_cache[case_id]

    def _case(self, case_id: str) -> zarr.Group:
        if case_id not in self._cases:
            if case_id not in self.manifest.cases:
                raise StoreError(f"{self.uri}: no case {case_id!r}")
            if self._root is None:
                self._root = open_group(self.uri, self.storage_options)
            group = self._root[f"{CASES}/{case_id}"]
            if group.attrs.get(COMPLETE) is not True:
                raise StoreError(f"{self.uri}: case {case_id!r} is incomplete")
            self._cases[case_id] = group
        return self._cases[case_id]
