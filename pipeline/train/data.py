"""Training batches: patches from the task stores, nnU-Net's sampling and augmentation, loaders.

`BatchStream` is an endless-until-done iterable of batches from `start_epoch` on. Batch k of the
stream is fully determined by (seed, rank, epoch, index): its tasks come from the TaskSampler's
schedule, its patches and augmentation from a generator seeded with those numbers. Loader
worker w makes batches k with k % num_workers == w, and torch's DataLoader hands them back
round-robin, so the stream is the same with 0, 1 or 8 workers and after a resume.

A sample, as nnU-Net v2 makes it (`pipeline/train/augment.py` has the ranges):
1. a training case, uniformly; foreground oversampling follows nnU-Net: the last
   round(B * f) samples of a batch are forced (one in a batch of 2 at f = 1/3): a class present
   in the case, uniformly, then one of its stored voxels, which becomes the centre of the final
   patch, so the foreground is in the final patch, not merely in a larger read. Other samples:
   the final patch uniformly over the positions inside the volume (centred and zero-padded
   where the volume is smaller than the patch);
2. the spatial transform (rotation, scaling) is drawn. nnU-Net reads a larger patch whose size
   covers the transforms of its ranges, transforms it about its centre and crops the final
   patch there; we read, per sample, only the box the drawn transform reaches around the same
   centre (no larger read for the two thirds of samples that are neither rotated nor scaled)
   and evaluate the transformed grid on it: the same voxels. Where the volume is large enough
   the centre moves inwards until that box lies inside it, so the final patch holds no padded
   zeros; a forced sample's centre moves only as far as its voxel stays in the final patch
   (foreground first, as nnU-Net, which pads);
3. intensity transforms and mirroring are drawn (`pipeline/train/augment.py`, `SampleDraw`).

`read_sample` makes every draw of steps 1-3 and reads the region; `augment` applies the draw
with torch ops. Where it runs is `train.augment_on`: "loader" (default) applies it in the
loader worker on the CPU and ships the final batch; "device" ships the raw batch (`RawBatch`:
each sample's region, a different size per sample, its label and its draw) and the training
worker applies it on its own device after the copy (`augment_batch`), its GPU when it has one.
The draws, and so the stream, are the same either way; the noise field alone differs between a
CPU and a GPU (each device's torch generator, seeded by the drawn seed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.common.geometry import CaseMeta
from pipeline.train.augment import (
    AUGMENTATIONS,
    Augmentation,
    SampleDraw,
    augment,
    draw_intensity,
    draw_mirror,
    draw_spatial,
    half_extent,
)
from pipeline.train.sampling import TaskSampler

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]  # image (B, C, Z, Y, X) float32, label (B, Z, Y, X) long, task, num_classes (B,)
RawBatch = dict[str, Any]  # regions, region_labels: per sample; draws: SampleDraw per sample; task, num_classes
Triple = tuple[int, int, int]


class PatchSource(Protocol):
    """What training needs from a task store (`pipeline.common.store.TaskStore`)."""

    def case_ids(self, split: str = "all") -> list[str]: ...

    def case_meta(self, case_id: str) -> CaseMeta: ...

    def class_locations(self, case_id: str) -> dict[int, np.ndarray]: ...

    def read_patch(self, case_id: str, start: Triple, size: Triple) -> tuple[np.ndarray, np.ndarray | None]: ...


def open_store(uri: str, storage_options: dict[str, Any] | None = None, fold: int | None = None) -> Any:
    """Open one task store (imported lazily: loader workers open their own handles); `fold`: the
    cross-validation fold held out (`data.fold`, used by the loop's batch loader)."""
    from pipeline.common.store import TaskStore

    return TaskStore.open(uri, storage_options=storage_options, fold=fold)


# --- one sample ------------------------------------------------------------------------------


class TrainingCases:
    """A store's training cases with their shapes (read once per loader worker)."""

    def __init__(self, source: PatchSource):
        self.source = source
        self.ids = source.case_ids("train")
        if not self.ids:
            raise ValueError(f"{getattr(source, 'uri', source)}: no training cases to sample from")
        self._shapes: dict[str, Triple] = {}

    def shape(self, case_id: str) -> Triple:
        if case_id not in self._shapes:
            self._shapes[case_id] = tuple(int(n) for n in self.source.case_meta(case_id).shape)  # type: ignore[assignment]
        return self._shapes[case_id]

    def foreground_voxel(self, rng: np.random.Generator, case_id: str) -> np.ndarray | None:
        """nnU-Net's pick: a foreground class present in the case, then one of its voxels."""
        present = [v for c, v in sorted(self.source.class_locations(case_id).items()) if c > 0 and len(v)]
        if not present:
            return None
        voxels = present[int(rng.integers(len(present)))]
        return voxels[int(rng.integers(len(voxels)))]


def patch_start(rng: np.random.Generator, shape: Sequence[int], patch: Sequence[int],
                voxel: np.ndarray | None) -> Triple:
    """Start (z, y, x) of the untransformed final patch: centred on `voxel` or uniform, inside
    the volume where it fits, centred on the volume where it does not."""
    start = []
    for axis, (n, p) in enumerate(zip(shape, patch)):
        if n <= p:
            start.append((n - p) // 2)
        elif voxel is None:
            start.append(int(rng.integers(0, n - p + 1)))
        else:
            start.append(int(np.clip(int(voxel[axis]) - p // 2, 0, n - p)))
    return tuple(start)  # type: ignore[return-value]


def inward_centre(centre: np.ndarray, reach: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Move the centre (voxel coordinates) so the box centre +- reach lies inside the volume on
    every axis where it can; centred on the volume where it cannot."""
    out = centre.copy()
    for axis, n in enumerate(shape):
        if 2 * reach[axis] <= n - 1:
            out[axis] = np.clip(centre[axis], reach[axis], n - 1 - reach[axis])
        else:
            out[axis] = (n - 1) / 2
    return out


def keep_voxel_inside(start: np.ndarray, goal: np.ndarray, voxel: np.ndarray, matrix: np.ndarray,
                      patch: Sequence[int]) -> np.ndarray:
    """The point nearest `goal` on the segment start -> goal whose transformed patch still holds
    `voxel` (one voxel in from its faces); `start` must hold it (bisection: the valid points form
    a convex set)."""
    inverse = np.linalg.inv(matrix)
    limit = np.maximum((np.asarray(patch, dtype=np.float64) - 1) / 2 - 1, 0)

    def holds(centre: np.ndarray) -> bool:
        return bool(np.all(np.abs(inverse @ (voxel - centre)) <= limit + 1e-9))

    if holds(goal):
        return goal
    low, high = 0.0, 1.0
    for _ in range(20):
        middle = (low + high) / 2
        low, high = (middle, high) if holds(start + middle * (goal - start)) else (low, middle)
    return start + low * (goal - start)


@dataclass(frozen=True)
class Sample:
    """One sample as the loader reads it: the region its spatial transform reaches and every
    random choice of its augmentation (`augment` makes the final patch of it)."""

    image: torch.Tensor  # (C, z, y, x) float32
    label: torch.Tensor  # (z, y, x) uint8
    draw: SampleDraw


def read_sample(cases: TrainingCases, rng: np.random.Generator, patch: Triple, force_foreground: bool,
                augmentation: Augmentation) -> Sample:
    """Draw one training sample (module docstring, 1-3) and read its region."""
    case_id = cases.ids[int(rng.integers(len(cases.ids)))]
    shape = cases.shape(case_id)
    voxel = cases.foreground_voxel(rng, case_id) if force_foreground else None
    start = patch_start(rng, shape, patch, voxel)
    matrix = draw_spatial(rng, augmentation.spatial)
    if matrix is None:
        image, label = cases.source.read_patch(case_id, start, patch)
        centre, labels = tuple((p - 1) / 2 for p in patch), ()
    else:
        reach = half_extent(matrix, patch)
        if voxel is None:
            centre = inward_centre(np.add(start, (np.asarray(patch) - 1) / 2), reach, shape)
        else:
            voxel = np.asarray(voxel, dtype=np.float64)
            centre = keep_voxel_inside(voxel, inward_centre(voxel, reach, shape), voxel, matrix, patch)
        low = np.floor(centre - reach).astype(int)
        size = tuple(int(n) for n in np.ceil(centre + reach).astype(int) - low + 1)
        image, label = cases.source.read_patch(case_id, tuple(int(v) for v in low), size)
        centre = tuple(float(c) for c in centre - low)
        labels = tuple(v for v in range(int(label.max()) + 1) if (label == v).any())
    image = torch.from_numpy(np.asarray(image, np.float32))
    draw = SampleDraw(None if matrix is None else tuple(map(tuple, matrix.tolist())), centre, patch, labels,
                      draw_intensity(rng, augmentation, image.shape[0]), draw_mirror(rng, augmentation))
    return Sample(image, torch.from_numpy(np.asarray(label, np.uint8)), draw)


def sample_patch(cases: TrainingCases, rng: np.random.Generator, patch: Triple, force_foreground: bool,
                 augmentation: Augmentation) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented (image CZYX float32, label ZYX uint8) training sample, on the CPU."""
    sample = read_sample(cases, rng, patch, force_foreground, augmentation)
    return augment(sample.image, sample.label, sample.draw)


# --- batches ------------------------------------------------------------------------------


def forced_foreground(batch_size: int, fraction: float) -> list[bool]:
    """nnU-Net's rule: the last round(B * fraction) samples of a batch must hold foreground."""
    first_forced = round(batch_size * (1 - fraction))
    return [i >= first_forced for i in range(batch_size)]


def collate(images: Sequence[torch.Tensor | np.ndarray], labels: Sequence[torch.Tensor | np.ndarray],
            task_ids: Sequence[int], num_classes: Sequence[int]) -> Batch:
    """Stack samples (on their device); images are zero-padded to the widest channel count in the
    batch; `num_classes` per task."""
    return _stack(images, labels) | _tasks(task_ids, num_classes)


def _tasks(task_ids: Sequence[int], num_classes: Sequence[int]) -> Batch:
    return {"task": torch.tensor(task_ids, dtype=torch.long),
            "num_classes": torch.tensor([num_classes[t] for t in task_ids], dtype=torch.long)}


def _stack(images: Sequence[torch.Tensor | np.ndarray], labels: Sequence[torch.Tensor | np.ndarray]) -> Batch:
    images = [torch.as_tensor(im) for im in images]
    channels = max(im.shape[0] for im in images)
    batch = images[0].new_zeros((len(images), channels, *images[0].shape[1:]), dtype=torch.float32)
    for i, im in enumerate(images):
        batch[i, : im.shape[0]] = im
    return {"image": batch, "label": torch.stack([torch.as_tensor(lab) for lab in labels]).long()}


def augment_batch(raw: RawBatch, device: torch.device) -> Batch:
    """The training batch of a raw one (`BatchStream` with augment_on="device"): each sample's
    region moved to `device` and augmented there as drawn, then stacked; task and num_classes
    stay on the CPU, as the loader's batches have them. A raw batch is augmented once: on the
    CPU its regions are changed in place."""
    images, labels = [], []
    for image, label, draw in zip(raw["regions"], raw["region_labels"], raw["draws"]):
        image, label = augment(image.to(device, non_blocking=True), label.to(device, non_blocking=True), draw)
        images.append(image)
        labels.append(label)
    return _stack(images, labels) | {"task": raw["task"], "num_classes": raw["num_classes"]}


@dataclass
class BatchStream(IterableDataset):
    """Training batches of every epoch from (start_epoch, start_batch) to the end of training."""

    sampler: TaskSampler
    store_uris: Sequence[str]
    num_classes: Sequence[int]
    patch_size: tuple[int, int, int]
    epochs: int
    start_epoch: int = 0
    start_batch: int = 0
    foreground_fraction: float = 0.33
    augmentation: str = "nnunet"
    augment_on: str = "loader"  # "loader": batches as training takes them; "device": raw (`augment_batch`)
    storage_options: dict[str, Any] | None = None
    opener: Callable[[str, dict[str, Any] | None], PatchSource] = open_store

    def __post_init__(self) -> None:
        super().__init__()
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
        if self.augment_on not in ("loader", "device"):
            raise ValueError(f"unknown augment_on {self.augment_on!r}; choose loader or device")

    def positions(self) -> Iterator[tuple[int, int, tuple[int, ...]]]:
        """(epoch, batch index, task ids) of every batch still to come."""
        for epoch in range(self.start_epoch, self.epochs):
            first = self.start_batch if epoch == self.start_epoch else 0
            schedule = self.sampler.schedule(epoch)
            for index in range(first, len(schedule)):
                yield epoch, index, schedule[index]

    def __iter__(self) -> Iterator[Batch | RawBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        stores = [TrainingCases(self.opener(uri, self.storage_options)) for uri in self.store_uris]
        augmentation = AUGMENTATIONS[self.augmentation](self.patch_size)
        for k, (epoch, index, task_ids) in enumerate(self.positions()):
            if k % workers == worker:
                yield self.make_batch(stores, augmentation, epoch, index, task_ids)

    def make_batch(self, stores: Sequence[TrainingCases], augmentation: Augmentation, epoch: int, index: int,
                   task_ids: Sequence[int]) -> Batch | RawBatch:
        """Batch `index` of `epoch`: augmented here (augment_on="loader") or raw ("device")."""
        rng = np.random.default_rng([self.sampler.seed, self.sampler.rank, epoch, index])
        samples = [
            read_sample(stores[task], rng, self.patch_size, force, augmentation)
            for task, force in zip(task_ids, forced_foreground(len(task_ids), self.foreground_fraction))
        ]
        raw = {
            "regions": [s.image for s in samples],
            "region_labels": [s.label for s in samples],
            "draws": [s.draw for s in samples],
        } | _tasks(task_ids, self.num_classes)
        return raw if self.augment_on == "device" else augment_batch(raw, torch.device("cpu"))


def make_loader(stream: BatchStream, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over whole batches; workers prefetch in the background (fork start)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
