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
3. intensity transforms and mirroring.
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
    augment_intensity,
    draw_spatial,
    half_extent,
    mirror,
    resample_patch,
)
from pipeline.train.sampling import TaskSampler

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
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


def sample_patch(cases: TrainingCases, rng: np.random.Generator, patch: Triple, force_foreground: bool,
                 augmentation: Augmentation) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (image CZYX float32, label ZYX uint8) training sample (module docstring)."""
    case_id = cases.ids[int(rng.integers(len(cases.ids)))]
    shape = cases.shape(case_id)
    voxel = cases.foreground_voxel(rng, case_id) if force_foreground else None
    start = patch_start(rng, shape, patch, voxel)
    matrix = draw_spatial(rng, augmentation.spatial)
    if matrix is None:
        image, label = cases.source.read_patch(case_id, start, patch)
    else:
        reach = half_extent(matrix, patch)
        if voxel is None:
            centre = inward_centre(np.add(start, (np.asarray(patch) - 1) / 2), reach, shape)
        else:
            voxel = np.asarray(voxel, dtype=np.float64)
            centre = keep_voxel_inside(voxel, inward_centre(voxel, reach, shape), voxel, matrix, patch)
        low = np.floor(centre - reach).astype(int)
        size = tuple(int(n) for n in np.ceil(centre + reach).astype(int) - low + 1)
        region, region_label = cases.source.read_patch(case_id, tuple(int(v) for v in low), size)
        image, label = resample_patch(region, region_label, matrix, centre - low, patch)
    image, label = np.asarray(image, np.float32), np.asarray(label, np.uint8)
    if augmentation.intensity:
        image = augment_intensity(image, rng, in_plane=augmentation.spatial is not None and augmentation.spatial.in_plane)
    return mirror(image, label, rng, augmentation.mirror_axes)


# --- batches ------------------------------------------------------------------------------


def forced_foreground(batch_size: int, fraction: float) -> list[bool]:
    """nnU-Net's rule: the last round(B * fraction) samples of a batch must hold foreground."""
    first_forced = round(batch_size * (1 - fraction))
    return [i >= first_forced for i in range(batch_size)]


def collate(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], task_ids: Sequence[int],
            num_classes: Sequence[int]) -> Batch:
    """Stack samples; images are zero-padded to the widest channel count in the batch."""
    channels = max(im.shape[0] for im in images)
    batch = np.zeros((len(images), channels, *images[0].shape[1:]), dtype=np.float32)
    for i, im in enumerate(images):
        batch[i, : im.shape[0]] = im
    return {
        "image": torch.from_numpy(batch),
        "label": torch.from_numpy(np.stack(labels)).long(),
        "task": torch.tensor(task_ids, dtype=torch.long),
        "num_classes": torch.tensor([num_classes[t] for t in task_ids], dtype=torch.long),
    }


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
    storage_options: dict[str, Any] | None = None
    opener: Callable[[str, dict[str, Any] | None], PatchSource] = open_store

    def __post_init__(self) -> None:
        super().__init__()
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")

    def positions(self) -> Iterator[tuple[int, int, tuple[int, ...]]]:
        """(epoch, batch index, task ids) of every batch still to come."""
        for epoch in range(self.start_epoch, self.epochs):
            first = self.start_batch if epoch == self.start_epoch else 0
            schedule = self.sampler.schedule(epoch)
            for index in range(first, len(schedule)):
                yield epoch, index, schedule[index]

    def __iter__(self) -> Iterator[Batch]:
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
                   task_ids: Sequence[int]) -> Batch:
        rng = np.random.default_rng([self.sampler.seed, self.sampler.rank, epoch, index])
        samples = [
            sample_patch(stores[task], rng, self.patch_size, force, augmentation)
            for task, force in zip(task_ids, forced_foreground(len(task_ids), self.foreground_fraction))
        ]
        return collate([image for image, _ in samples], [label for _, label in samples], task_ids, self.num_classes)


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
