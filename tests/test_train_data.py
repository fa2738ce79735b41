"""Training batches: foreground oversampling, channel padding, augmentation, worker invariance."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from pipeline.train.data import (
    BatchStream,
    collate,
    fit_patch,
    forced_foreground,
    make_loader,
    nnunet_augmentation,
)
from pipeline.train.sampling import build_sampler

PATCH = (8, 16, 16)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as each training worker has; more only thrash on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FakeStore:
    """An in-memory PatchSource: noise with one small foreground cube per class."""

    def __init__(self, channels: int, classes: int, seed: int):
        rng = np.random.default_rng(seed)
        self.image = rng.normal(size=(channels, 16, 32, 32)).astype(np.float32)
        self.label = np.zeros((16, 32, 32), np.uint8)
        for c in range(1, classes):
            self.label[2 * c : 2 * c + 3, 20:24, 4 * c : 4 * c + 3] = c

    def sample_patch(self, rng: np.random.Generator, size: Sequence[int], force_foreground: bool, case_id=None):
        if force_foreground:
            z, y, x = np.argwhere(self.label > 0)[rng.integers((self.label > 0).sum())]
            start = [int(np.clip(v - s // 2, 0, d - s)) for v, s, d in zip((z, y, x), size, self.label.shape)]
        else:
            start = [int(rng.integers(0, d - s + 1)) for d, s in zip(self.label.shape, size)]
        window = tuple(slice(s, s + n) for s, n in zip(start, size))
        return self.image[(slice(None), *window)], self.label[window], "case_000"


FAKES = {"ct": FakeStore(1, 3, 0), "mr": FakeStore(2, 2, 1), "brain": FakeStore(4, 4, 2)}


def _stream(mixed: bool = False, augmentation: str = "none", **kwargs) -> BatchStream:
    sampler = build_sampler("balanced", [5, 5, 5], batches=6, batch_size=3, mixed=mixed, seed=3)
    return BatchStream(sampler, list(FAKES), [3, 2, 4], PATCH, epochs=2, augmentation=augmentation,
                       opener=lambda uri, options: FAKES[uri], **kwargs)


def test_forced_foreground_follows_nnunet() -> None:
    assert forced_foreground(2, 0.33) == [False, True]
    assert forced_foreground(3, 0.33) == [False, False, True]
    assert forced_foreground(4, 0.0) == [False] * 4
    assert forced_foreground(2, 1.0) == [True, True]


def test_collate_pads_channels_to_the_widest_task() -> None:
    images = [np.ones((1, 2, 2, 2), np.float32), np.full((4, 2, 2, 2), 2, np.float32)]
    labels = [np.zeros((2, 2, 2), np.uint8)] * 2
    batch = collate(images, labels, [0, 2], [3, 2, 4])
    assert batch["image"].shape == (2, 4, 2, 2, 2)
    assert batch["image"][0, 0].eq(1).all() and batch["image"][0, 1:].eq(0).all()
    assert batch["task"].tolist() == [0, 2] and batch["num_classes"].tolist() == [3, 4]


def test_fit_patch_pads_and_crops_centred() -> None:
    image, label = fit_patch(np.ones((1, 4, 6, 10), np.float32), np.ones((4, 6, 10), np.uint8), (6, 6, 8))
    assert image.shape == (1, 6, 6, 8) and label.shape == (6, 6, 8)
    assert label[0].sum() == 0 and label[1:5].all()


def test_stream_gives_the_sampler_schedule_and_forced_foreground() -> None:
    stream = _stream()
    batches = list(stream)
    assert len(batches) == 12  # 2 epochs x 6 batches
    expected = stream.sampler.schedule(0) + stream.sampler.schedule(1)
    assert [tuple(b["task"].tolist()) for b in batches] == expected
    for batch in batches:
        assert batch["image"].shape == (3, [1, 2, 4][batch["task"][0]], *PATCH)
        assert batch["label"][-1].gt(0).any()  # the last sample of each batch is forced to hold foreground


def test_mixed_batches_pad_to_the_widest_task_in_the_batch() -> None:
    for batch in _stream(mixed=True):
        widest = max([1, 2, 4][t] for t in batch["task"].tolist())
        assert batch["image"].shape[1] == widest


def test_stream_is_the_same_with_any_number_of_loader_workers() -> None:
    def collect(workers: int) -> list[dict[str, torch.Tensor]]:
        return list(make_loader(_stream(augmentation="nnunet"), workers))

    inline, parallel = collect(0), collect(2)
    assert len(inline) == len(parallel) == 12
    for a, b in zip(inline, parallel):
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_stream_resumes_mid_run() -> None:
    full = list(_stream())
    resumed = list(_stream(start_epoch=1, start_batch=2))
    assert len(resumed) == 4
    for a, b in zip(full[8:], resumed):
        torch.testing.assert_close(a["image"], b["image"])


def test_nnunet_augmentation_is_seeded_and_keeps_labels_valid() -> None:
    augment = nnunet_augmentation(PATCH)
    store = FAKES["brain"]
    image, label, _ = store.sample_patch(np.random.default_rng(0), PATCH, True)
    outputs = [augment(image.copy(), label.copy(), seed) for seed in range(12)]
    again = augment(image.copy(), label.copy(), 5)
    np.testing.assert_array_equal(outputs[5][0], again[0])
    changed = 0
    for out_image, out_label in outputs:
        assert out_image.shape == image.shape and out_image.dtype == np.float32
        assert out_label.shape == label.shape and out_label.dtype == np.uint8
        assert set(np.unique(out_label)) <= set(np.unique(label))
        assert np.isfinite(out_image).all()
        changed += not np.array_equal(out_image, image)
    assert changed >= 10  # mirroring alone changes 7 of 8 draws


def test_unknown_augmentation_is_named() -> None:
    with pytest.raises(ValueError, match="unknown augmentation 'heavy'"):
        _stream(augmentation="heavy")
