"""Augmentation on the training device (`train.augment_on: device`): the loader draws and reads,
the worker resamples, augments and mirrors after the copy. The draws are the loader path's, the
transforms the same torch code; here on the CPU, and on CUDA where there is one (`gpu` marker)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_train_data import FAKES, PATCH, FakeStore, one_thread  # noqa: F401 (one_thread: autouse fixture)
from test_train_loop import PATCH as LOOP_PATCH
from test_train_loop import TASKS

from model.presets import build_network, preset_spec
from pipeline.common.config import TrainConfig
from pipeline.train.augment import (
    INTENSITY,
    NNUNET_INTENSITY,
    Augmentation,
    SampleDraw,
    SpatialRanges,
    gaussian_blur,
    nnunet_augmentation,
    rotation_matrix,
)
from pipeline.train.data import BatchStream, TrainingCases, augment_batch, make_loader
from pipeline.train.optim import build_optimizer
from pipeline.train.sampling import build_sampler
from pipeline.train.step import train_step

CPU = torch.device("cpu")
NOTHING = Augmentation(SpatialRanges(math.pi / 6, False, p_rotation=0.0, p_scaling=0.0),
                       tuple((name, 0.0) for name in INTENSITY), (0, 1, 2), p_mirror=0.0)


def _stream(augment_on: str, batches: int = 6, patch: tuple[int, int, int] = PATCH, **kwargs) -> BatchStream:
    sampler = build_sampler("balanced", [5, 5, 5], batches=batches, batch_size=3, mixed=True, seed=3)
    return BatchStream(sampler, list(FAKES), [3, 2, 4], patch, epochs=1, augment_on=augment_on,
                       opener=lambda uri, options: FAKES[uri], **kwargs)


def _batches(stream: BatchStream, augmentation: Augmentation) -> list[dict]:
    """Every batch of the stream's first epoch, made with `augmentation` (any ranges, not only a
    registered name)."""
    stores = [TrainingCases(FAKES[uri]) for uri in stream.store_uris]
    return [stream.make_batch(stores, augmentation, 0, index, tasks)
            for index, tasks in enumerate(stream.sampler.schedule(0))]


# --- 1. the draws: the same in both modes, nnU-Net's frequencies -----------------------------


def test_both_modes_draw_the_same_and_give_the_same_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same (seed, rank, epoch, index) gives the same draws in both modes; applied on the CPU,
    the device path's batch is the loader's, bit for bit (noise included: same CPU generator), so
    also where the transforms are deterministic (CUDA against the CPU: the `gpu` test below)."""
    import pipeline.train.data as data

    applied: list[SampleDraw] = []
    real_augment = data.augment

    def recording(image: torch.Tensor, label: torch.Tensor, draw: SampleDraw) -> tuple[torch.Tensor, torch.Tensor]:
        applied.append(draw)
        return real_augment(image, label, draw)

    monkeypatch.setattr(data, "augment", recording)
    augmentation = nnunet_augmentation(PATCH)
    on_loader = _batches(_stream("loader"), augmentation)
    loader_draws, applied[:] = list(applied), []
    raw = _batches(_stream("device"), augmentation)
    assert not applied  # the device mode's loader applies nothing
    assert loader_draws == [d for r in raw for d in r["draws"]] and len(loader_draws) == 18
    for batch, raw_batch in zip(on_loader, raw, strict=True):
        on_device = augment_batch(raw_batch, CPU)
        assert set(on_device) == set(batch) == {"image", "label", "task", "num_classes"}
        for key in batch:
            assert on_device[key].dtype == batch[key].dtype and torch.equal(on_device[key], batch[key]), key


def test_draw_frequencies_follow_nnunet() -> None:
    """Over 2000 samples, each transform fires with nnU-Net's probability (within 4 binomial
    standard deviations): spatial (not rotated and not scaled 0.8 x 0.8), each intensity transform,
    each channel of the per-channel ones (0.5), each mirrored axis (0.5)."""
    stream = _stream("device", batches=666)
    draws = [d for raw in _batches(stream, nnunet_augmentation(PATCH)) for d in raw["draws"]]

    def near(hits: list[bool], probability: float) -> None:
        n = len(hits)
        assert abs(sum(hits) - n * probability) <= 4 * math.sqrt(n * probability * (1 - probability)) + 1, \
            (sum(hits), n, probability)

    near([d.matrix is None for d in draws], 0.8 * 0.8)
    for name, probability in NNUNET_INTENSITY:
        near([name in dict(d.intensity) for d in draws], probability)
    for name in ("gaussian_blur", "low_resolution"):
        near([c is not None for d in draws for c in dict(d.intensity).get(name, ())], 0.5)
    for axis in (0, 1, 2):
        near([axis in d.flips for d in draws], 0.5)
    factors = [f for d in draws for f in dict(d.intensity).get("brightness", ())]
    near([f < 1 for f in factors], 0.5)
    assert all(0.75 <= f <= 1.25 for f in factors)


def test_raw_batches_are_the_same_from_loader_workers() -> None:
    """Raw batches (lists of regions, draws) cross the DataLoader's worker processes intact, in
    the stream's order, whatever the number of workers."""
    inline, parallel = list(make_loader(_stream("device"), 0)), list(make_loader(_stream("device"), 2))
    assert len(inline) == len(parallel) == 6
    for a, b in zip(inline, parallel):
        assert a["draws"] == b["draws"] and torch.equal(a["task"], b["task"])
        for key in ("regions", "region_labels"):
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True))


# --- 2.-4. what the device path makes ------------------------------------------------------


def test_quarter_turn_and_zoom_keep_image_and_label_aligned() -> None:
    """An asymmetric object, rotated 90 degrees in the (y, x) plane and zoomed out 2x through the
    device path: the expected rotated arrays, and the label is still the thresholded image."""
    label = np.zeros((9, 17, 17), np.uint8)
    label[2:7, 3:9, 4:7] = 1  # an L: a bar and a foot, no symmetry a wrong turn could hide behind
    label[2:7, 9:14, 4:12] = 2
    image = (label.astype(np.float32) * 2 + 1)[None]
    matrix = rotation_matrix((math.pi / 2, 0, 0)) @ np.diag([2.0, 2.0, 2.0])
    centre, patch = (4.0, 8.0, 8.0), (5, 9, 9)
    draw = SampleDraw(tuple(map(tuple, matrix)), centre, patch, (0, 1, 2), (), ())
    raw = {"regions": [torch.from_numpy(image)], "region_labels": [torch.from_numpy(label)], "draws": [draw],
           "task": torch.tensor([0]), "num_classes": torch.tensor([3])}
    batch = augment_batch(raw, CPU)
    # offset (z, y, x) -> centre + 2 * (z, -x, y): every second voxel, turned a quarter
    o = np.stack(np.meshgrid(*[np.arange(p) - p // 2 for p in patch], indexing="ij"))
    z, y, x = 4 + 2 * o[0], 8 - 2 * o[2], 8 + 2 * o[1]
    assert set(np.unique(label[z, y, x])) == {0, 1, 2}
    np.testing.assert_array_equal(batch["label"][0].numpy(), label[z, y, x])
    np.testing.assert_allclose(batch["image"][0, 0].numpy(), image[0][z, y, x], atol=1e-4)
    thresholded = np.digitize(batch["image"][0, 0].numpy(), [2.0, 4.0])  # 1 -> 0, 3 -> 1, 5 -> 2
    np.testing.assert_array_equal(thresholded, batch["label"][0].numpy())
    assert batch["label"].dtype == torch.long and batch["image"].dtype == torch.float32


def test_with_every_probability_zero_the_output_is_the_crop_itself() -> None:
    """No transform drawn: the device path returns the region the loader read, which is the final
    patch of the volume, bit for bit."""
    volume = FakeStore(2, 3, 7, shape=(20, 40, 40))
    reads = []

    def recording(case_id, start, size):
        reads.append((start, size))
        return FakeStore.read_patch(volume, case_id, start, size)

    volume.read_patch = recording
    sampler = build_sampler("balanced", [1], batches=8, batch_size=2, seed=1)
    stream = BatchStream(sampler, ["x"], [3], PATCH, epochs=1, augment_on="device", opener=lambda u, o: volume)
    for index in range(8):
        reads.clear()
        batch = augment_batch(stream.make_batch([TrainingCases(volume)], NOTHING, 0, index, (0, 0)), CPU)
        for i, (start, size) in enumerate(reads):
            assert size == PATCH
            window = tuple(slice(s, s + n) for s, n in zip(start, size))
            assert torch.equal(batch["image"][i], torch.from_numpy(volume.image[(slice(None), *window)]))
            assert torch.equal(batch["label"][i], torch.from_numpy(volume.label[window]).long())


def test_labels_stay_in_each_task_label_set() -> None:
    """Random nnU-Net draws (spatial every time), mixed 1-, 2- and 4-channel tasks: every label is
    one of its task's classes, the image finite, the layout the loop's."""
    always = nnunet_augmentation(PATCH)
    always = Augmentation(SpatialRanges(math.pi / 6, False, 1.0, 1.0), always.intensity, always.mirror_axes)
    for raw in _batches(_stream("device", batches=8), always):
        batch = augment_batch(raw, CPU)
        widest = max([1, 2, 4][t] for t in raw["task"].tolist())
        assert batch["image"].shape == (3, widest, *PATCH) and batch["image"].isfinite().all()
        assert batch["label"].shape == (3, *PATCH) and batch["label"].dtype == torch.long
        for label, classes in zip(batch["label"], batch["num_classes"].tolist()):
            assert set(label.unique().tolist()) <= set(range(classes))


def test_blur_is_scipys_gaussian_filter() -> None:
    """The banded-matrix blur is scipy.ndimage.gaussian_filter (truncate 4, mode reflect),
    edges included, on an axis shorter than the kernel too."""
    from scipy import ndimage

    image = np.random.default_rng(0).normal(size=(2, 3, 12, 9)).astype(np.float32)
    sigmas = ((0.5, 1.0, 0.7), None)
    blurred = gaussian_blur(torch.from_numpy(image.copy()), sigmas).numpy()
    np.testing.assert_allclose(blurred[0], ndimage.gaussian_filter(image[0], sigmas[0]), atol=1e-6)
    np.testing.assert_array_equal(blurred[1], image[1])


# --- on CUDA ------------------------------------------------------------------------------

EVERYTHING = Augmentation(SpatialRanges(math.pi / 6, False, 1.0, 1.0), tuple((n, 1.0) for n in INTENSITY), (0, 1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_training_steps_with_device_augmentation_on_cuda() -> None:
    """augment_on="device" on CUDA: pinned raw batches (every transform drawn, mixed tasks) are
    augmented on the GPU and train two AMP steps of the tiny UniSeg."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    network = build_network(preset_spec("tiny", patch_size=LOOP_PATCH), TASKS).to(cuda)
    optimizer = build_optimizer(network.parameters(), TrainConfig())
    scaler = torch.amp.GradScaler("cuda", enabled=True)
    losses = []
    for raw in _batches(_stream("device", batches=2, patch=LOOP_PATCH), EVERYTHING):
        raw = {k: [t.pin_memory() for t in v] if k.startswith("region") else v for k, v in raw.items()}
        batch = augment_batch(raw, cuda)
        assert batch["image"].device.type == "cuda" and batch["image"].shape[2:] == LOOP_PATCH
        assert batch["label"].dtype == torch.long and batch["label"].max().item() < 4
        losses.append(train_step(network, batch, optimizer, scaler, cuda, True, "dice_ce", 12.0))
    assert len(losses) == 2 and all(torch.isfinite(loss) for loss in losses)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_batch_for_the_same_draws() -> None:
    """Every deterministic transform (all but the noise, whose field is each device's generator)
    on CUDA and on the CPU from the same raw batches: equal up to float error; labels may differ
    only where two classes' interpolated masks tie."""
    cuda = torch.device("cuda")
    no_noise = Augmentation(EVERYTHING.spatial, tuple((n, 0.0 if n == "gaussian_noise" else 1.0) for n in INTENSITY),
                            (0, 1, 2))
    for raw in _batches(_stream("device", batches=3), no_noise):
        on_gpu = augment_batch(raw, cuda)  # first: on the CPU, augment_batch changes the regions in place
        on_cpu = augment_batch(raw, CPU)
        torch.testing.assert_close(on_gpu["image"].cpu(), on_cpu["image"], atol=1e-3, rtol=1e-3)
        assert (on_gpu["label"].cpu() != on_cpu["label"]).float().mean().item() < 1e-3
