"""Training batches: patches from the task stores, nnU-Net style augmentation, loader workers.

`BatchStream` is an endless-until-done iterable of batches from `start_epoch` on. Batch k of the
stream is fully determined by (seed, rank, epoch, index): its tasks come from the TaskSampler's
schedule, its patches and augmentation from a generator seeded with those numbers. Loader
worker w makes batches k with k % num_workers == w, and torch's DataLoader hands them back
round-robin, so the stream is the same with 0, 1 or 8 workers and after a resume.

Foreground oversampling follows nnU-Net: the last round(B * f) samples of a batch are forced
to contain foreground (one in a batch of 2 at f = 1/3).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.train.sampling import TaskSampler

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Augment = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


class PatchSource(Protocol):
    """What training needs from a task store (`pipeline.common.store.TaskStore`)."""

    def sample_patch(
        self, rng: np.random.Generator, size: Sequence[int], force_foreground: bool, case_id: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, str]: ...


def open_store(uri: str, storage_options: dict[str, Any] | None = None, fold: int | None = None) -> Any:
    """Open one task store (imported lazily: loader workers open their own handles); `fold`: the
    cross-validation fold held out (`data.fold`)."""
    from pipeline.common.store import TaskStore

    return TaskStore.open(uri, storage_options=storage_options, fold=fold)


# --- augmentation -----------------------------------------------------------------------------


def _nnunet_transforms(patch_size: Sequence[int]) -> Any:
    """nnU-Net "moreDA"-like augmentation from MONAI dict transforms (elastic deformation off)."""
    from monai import transforms as mt

    anisotropic = max(patch_size) / min(patch_size) > 3
    rotation = (math.pi / 6, 0.0, 0.0) if anisotropic else (math.pi / 6,) * 3
    image, both = ["image"], ["image", "label"]
    return mt.Compose(
        [
            mt.RandAffined(
                both, prob=0.35, rotate_range=rotation, scale_range=(0.3, 0.3, 0.3),
                mode=("bilinear", "nearest"), padding_mode="zeros",
            ),
            mt.RandGaussianNoised(image, prob=0.1, std=0.1),
            mt.RandGaussianSmoothd(image, prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
            mt.RandScaleIntensityd(image, prob=0.15, factors=0.25),  # brightness (multiplicative)
            mt.RandScaleIntensityFixedMeand(image, prob=0.15, factors=0.25, preserve_range=True),  # contrast
            mt.RandSimulateLowResolutiond(image, prob=0.25, zoom_range=(0.5, 1.0)),
            mt.RandAdjustContrastd(image, prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
            mt.RandAdjustContrastd(image, prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
            mt.RandFlipd(both, prob=0.5, spatial_axis=0),
            mt.RandFlipd(both, prob=0.5, spatial_axis=1),
            mt.RandFlipd(both, prob=0.5, spatial_axis=2),
        ]
    )


def nnunet_augmentation(patch_size: Sequence[int]) -> Augment:
    """Returns augment(image CZYX, label ZYX, seed) -> (image, label), deterministic by seed."""
    from monai.data import set_track_meta

    set_track_meta(False)
    compose = _nnunet_transforms(patch_size)

    def augment(image: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        compose.set_random_state(seed=seed)
        out = compose({"image": torch.as_tensor(image), "label": torch.as_tensor(label[None], dtype=torch.float32)})
        return np.asarray(out["image"], dtype=np.float32), np.rint(np.asarray(out["label"][0])).astype(np.uint8)

    return augment


def no_augmentation(patch_size: Sequence[int]) -> Augment:
    return lambda image, label, seed: (image, label)


AUGMENTATIONS: dict[str, Callable[[Sequence[int]], Augment]] = {
    "nnunet": nnunet_augmentation,
    "none": no_augmentation,
}


# --- batches ------------------------------------------------------------------------------


def forced_foreground(batch_size: int, fraction: float) -> list[bool]:
    """nnU-Net's rule: the last round(B * fraction) samples of a batch must hold foreground."""
    first_forced = round(batch_size * (1 - fraction))
    return [i >= first_forced for i in range(batch_size)]


def fit_patch(image: np.ndarray, label: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad (centred) or centre-crop a patch to `size`; stores normally return it exact."""
    if tuple(label.shape) == tuple(size):
        return image, label
    slices, pads = [], []
    for have, want in zip(label.shape, size):
        start = max(0, (have - want) // 2)
        slices.append(slice(start, start + want))
        missing = max(0, want - have)
        pads.append((missing // 2, missing - missing // 2))
    image = np.pad(image[(slice(None), *slices)], [(0, 0), *pads])
    label = np.pad(label[tuple(slices)], pads)
    return image, label


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
        stores = [self.opener(uri, self.storage_options) for uri in self.store_uris]
        augment = AUGMENTATIONS[self.augmentation](self.patch_size)
        for k, (epoch, index, task_ids) in enumerate(self.positions()):
            if k % workers == worker:
                yield self.make_batch(stores, augment, epoch, index, task_ids)

    def make_batch(self, stores: Sequence[PatchSource], augment: Augment, epoch: int, index: int,
                   task_ids: Sequence[int]) -> Batch:
        rng = np.random.default_rng([self.sampler.seed, self.sampler.rank, epoch, index])
        images, labels = [], []
        for task, force in zip(task_ids, forced_foreground(len(task_ids), self.foreground_fraction)):
            image, label, _ = stores[task].sample_patch(rng, self.patch_size, force)
            image, label = fit_patch(np.asarray(image, np.float32), np.asarray(label, np.uint8), self.patch_size)
            image, label = augment(image, label, int(rng.integers(2**31)))
            images.append(image)
            labels.append(label)
        return collate(images, labels, task_ids, self.num_classes)


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
