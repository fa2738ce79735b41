"""Training batches: nnU-Net's sampling geometry and augmentation, channel padding, worker invariance."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.train.augment import (
    Augmentation,
    SampleDraw,
    SpatialRanges,
    augment,
    contrast,
    draw_intensity,
    draw_spatial,
    gamma,
    nnunet_augmentation,
    resample_patch,
    rotation_matrix,
)
from pipeline.train.data import (
    BatchStream,
    TrainingCases,
    collate,
    forced_foreground,
    make_loader,
    sample_patch,
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
    """An in-memory PatchSource: one case of noise with one small foreground cube per class."""

    def __init__(self, channels: int, classes: int, seed: int, shape: tuple[int, int, int] = (16, 32, 32)):
        rng = np.random.default_rng(seed)
        self.image = rng.normal(size=(channels, *shape)).astype(np.float32)
        self.label = np.zeros(shape, np.uint8)
        for c in range(1, classes):
            self.label[2 * c : 2 * c + 3, 20:24, 4 * c : 4 * c + 3] = c
        self.classes = classes

    def case_ids(self, split: str = "all") -> list[str]:
        return ["case_000"]

    def case_meta(self, case_id: str) -> SimpleNamespace:
        return SimpleNamespace(shape=self.label.shape)

    def class_locations(self, case_id: str) -> dict[int, np.ndarray]:
        return {c: np.argwhere(self.label == c) for c in range(1, self.classes)}

    def read_patch(self, case_id: str, start, size):
        """The window at `start`, zero (background) outside the volume, as TaskStore.read_patch."""
        image = np.zeros((self.image.shape[0], *size), np.float32)
        label = np.zeros(size, np.uint8)
        source = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, size, self.label.shape))
        target = tuple(slice(src.start - s, src.stop - s) for src, s in zip(source, start))
        if all(src.stop > src.start for src in source):
            image[(slice(None), *target)] = self.image[(slice(None), *source)]
            label[target] = self.label[source]
        return image, label


FAKES = {"ct": FakeStore(1, 3, 0), "mr": FakeStore(2, 2, 1), "brain": FakeStore(4, 4, 2)}
ALWAYS_SPATIAL = Augmentation(SpatialRanges(math.pi / 6, False, p_rotation=1.0, p_scaling=1.0), (), ())
NO_AUGMENTATION = Augmentation(None, (), ())


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


def test_unknown_augmentation_is_named() -> None:
    with pytest.raises(ValueError, match="unknown augmentation 'heavy'"):
        _stream(augmentation="heavy")


# --- sample, transform, crop geometry -------------------------------------------------------


def _resample(volume: FakeStore, matrix: np.ndarray, centre, patch) -> tuple[np.ndarray, np.ndarray]:
    """`resample_patch` of a whole fake volume, as numpy arrays."""
    image, label = resample_patch(torch.from_numpy(volume.image), torch.from_numpy(volume.label), matrix, centre,
                                  patch, range(volume.classes))
    return image.numpy(), label.numpy()


def test_identity_transform_is_the_plain_crop() -> None:
    volume = FAKES["brain"]
    image, label = _resample(volume, np.eye(3), (5.5, 21.5, 9.5), PATCH)
    np.testing.assert_allclose(image, volume.image[:, 2:10, 14:30, 2:18], atol=1e-4)  # float32 grid
    np.testing.assert_array_equal(label, volume.label[2:10, 14:30, 2:18])


def test_quarter_turn_and_zoom_have_known_answers() -> None:
    """90 degrees in the (y, x) plane maps offset (z, y, x) to (z, -x, y); scale 2 doubles offsets."""
    volume = FAKES["ct"]
    centre, patch = np.array([8, 16, 16]), (5, 7, 7)
    image, label = _resample(volume, rotation_matrix((math.pi / 2, 0, 0)), centre, patch)
    o = np.stack(np.meshgrid(*[np.arange(p) - p // 2 for p in patch], indexing="ij"))
    z, y, x = centre[0] + o[0], centre[1] - o[2], centre[2] + o[1]
    np.testing.assert_allclose(image[0], volume.image[0][z, y, x], atol=1e-4)
    np.testing.assert_array_equal(label, volume.label[z, y, x])
    image, label = _resample(volume, 2 * np.eye(3), centre, (3, 5, 5))
    np.testing.assert_allclose(image[0], volume.image[0][6:11:2, 12:21:2, 12:21:2], atol=1e-4)
    np.testing.assert_array_equal(label, volume.label[6:11:2, 12:21:2, 12:21:2])


def test_sampled_patch_is_the_centre_crop_of_the_transformed_volume() -> None:
    """Reading only the box the transform reaches gives what transforming all the data around the
    same centre and cropping the final patch gives (nnU-Net's larger patch, centre-cropped)."""
    volume = FakeStore(2, 3, 5, shape=(24, 48, 48))
    cases = TrainingCases(volume)
    for seed in range(10):
        read = {}

        def recording_read(case_id, start, size, read=read):
            read.update(start=np.array(start))
            return FakeStore.read_patch(volume, case_id, start, size)

        cases.source.read_patch = recording_read
        image, label = sample_patch(cases, np.random.default_rng([seed, 1]), PATCH, False, ALWAYS_SPATIAL)
        rng = np.random.default_rng([seed, 1])
        rng.integers(1)  # the case draw
        start = [int(rng.integers(0, n - p + 1)) for n, p in zip(volume.label.shape, PATCH)]
        matrix = draw_spatial(rng, ALWAYS_SPATIAL.spatial)
        # the centre the sample used, in volume coordinates, from the read box and the half extent
        reach = np.abs(matrix) @ ((np.array(PATCH) - 1) / 2)
        centre = np.clip(np.add(start, (np.array(PATCH) - 1) / 2), reach, np.array(volume.label.shape) - 1 - reach)
        assert (read["start"] == np.floor(centre - reach)).all()
        whole_image, whole_label = _resample(volume, matrix, centre, PATCH)
        np.testing.assert_allclose(image, whole_image, atol=1e-4)
        np.testing.assert_array_equal(label, whole_label)


def test_final_patches_hold_no_padded_zeros() -> None:
    """Every sample rotated and scaled to the limits of nnU-Net's ranges, forced onto foreground or
    not: no voxel of the final patch comes from outside the volume, which is large enough for the
    transformed patch. (A forced voxel at the very edge keeps the foreground and may pad, as
    nnU-Net does: `test_forced_samples_hold_foreground_in_the_final_patch`.)"""
    volume = FakeStore(1, 1, 3, shape=(32, 48, 48))
    volume.image = np.abs(volume.image) + 1.0  # any padded zero would pull values below 1
    volume.label[14:17, 10:30, 10:40] = 1
    volume.classes = 2
    cases = TrainingCases(volume)
    for seed in range(60):
        image, _ = sample_patch(cases, np.random.default_rng(seed), PATCH, seed % 2 == 0, ALWAYS_SPATIAL)
        assert image.shape == (1, *PATCH)
        assert image.min().item() >= 1.0 - 1e-5


def test_forced_samples_hold_foreground_in_the_final_patch() -> None:
    """nnU-Net's oversampling, decided on the final patch: with a small object and the patch
    rotated and scaled every time, forced samples still hold it; unforced ones rarely do."""
    volume = FakeStore(1, 2, 4, shape=(24, 48, 48))  # a 3 x 4 x 3 cube by the z = 0 face
    volume.label[20:24, 0:2, 46:48] = 1  # and 16 voxels in a corner
    cases = TrainingCases(volume)
    forced = [bool(sample_patch(cases, np.random.default_rng(s), PATCH, True, ALWAYS_SPATIAL)[1].any())
              for s in range(80)]
    free = [bool(sample_patch(cases, np.random.default_rng(s), PATCH, False, NO_AUGMENTATION)[1].any())
            for s in range(80)]
    assert np.mean(forced) == 1.0
    assert np.mean(free) < 0.5


def test_a_third_of_each_batch_is_forced_onto_foreground() -> None:
    sampler = build_sampler("balanced", [5], batches=40, batch_size=3, seed=0)
    stream = BatchStream(sampler, ["ct"], [3], PATCH, epochs=1, augmentation="nnunet",
                         opener=lambda uri, options: FakeStore(1, 3, 0, shape=(24, 48, 48)))
    holds = np.array([[sample.any().item() for sample in batch["label"]] for batch in stream])
    assert holds[:, 2].all()  # round(3 * (1 - 0.33)) = 2: the third sample of each batch is forced
    assert holds[:, :2].mean() < 0.6


# --- augmentation ranges and probabilities ---------------------------------------------------


def test_spatial_draws_follow_nnunet_probabilities_and_ranges() -> None:
    ranges = nnunet_augmentation((32, 64, 64)).spatial
    rng = np.random.default_rng(0)
    draws = [draw_spatial(rng, ranges) for _ in range(4000)]
    assert np.mean([d is None for d in draws]) == pytest.approx(0.8 * 0.8, abs=0.03)
    for matrix in (d for d in draws if d is not None):
        scale = abs(np.linalg.det(matrix)) ** (1 / 3)
        assert 0.7 - 1e-9 <= scale <= 1.4 + 1e-9
        rotation = matrix / scale
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)
        assert np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))) <= 3 * 30 + 1e-6


def test_anisotropic_patches_rotate_and_scale_in_plane_only() -> None:
    augmentation = nnunet_augmentation((8, 64, 64))  # max / z = 8 > 3: nnU-Net's "dummy 2D" case
    assert augmentation.spatial.in_plane and augmentation.spatial.max_rotation == pytest.approx(math.pi)
    rng = np.random.default_rng(1)
    for matrix in filter(lambda m: m is not None, (draw_spatial(rng, augmentation.spatial) for _ in range(300))):
        np.testing.assert_allclose(matrix[0], [1, 0, 0], atol=1e-12)
        np.testing.assert_allclose(matrix[:, 0], [1, 0, 0], atol=1e-12)


def test_intensity_transforms_keep_what_nnunet_keeps() -> None:
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(2.0, 3.0, size=(2, 8, 16, 16)).astype(np.float32))
    kept = contrast(image.clone(), (0.8, 1.25))
    assert kept.min() >= image.min() - 1e-5 and kept.max() <= image.max() + 1e-5
    gammaed = gamma(image.clone(), (0.7, 1.5))
    assert not torch.allclose(gammaed, image)
    torch.testing.assert_close(gammaed.mean(dim=(1, 2, 3)), image.mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gammaed.std(dim=(1, 2, 3)), image.std(dim=(1, 2, 3)), rtol=1e-3, atol=1e-5)
    augmentation = nnunet_augmentation(PATCH)
    outputs = []
    for s in range(40):
        intensity = draw_intensity(np.random.default_rng(s), augmentation, 2)
        draw = SampleDraw(None, (0.0, 0.0, 0.0), PATCH, (), intensity, ())
        outputs.append(augment(image.clone(), torch.zeros(PATCH, dtype=torch.uint8), draw)[0])
    assert all(o.shape == image.shape and o.dtype == torch.float32 and o.isfinite().all() for o in outputs)
    changed = np.mean([not torch.equal(o, image) for o in outputs])
    # P(no transform) = 0.9 * 0.8 * 0.85 * 0.85 * 0.75 * 0.9 * 0.7 = 0.246
    assert 0.55 < changed < 0.95


def test_nnunet_samples_are_seeded_and_keep_labels_valid() -> None:
    cases = TrainingCases(FAKES["brain"])
    augmentation = nnunet_augmentation(PATCH)
    outputs = [sample_patch(cases, np.random.default_rng(s), PATCH, True, augmentation) for s in range(12)]
    again = sample_patch(cases, np.random.default_rng(5), PATCH, True, augmentation)
    assert torch.equal(outputs[5][0], again[0])
    for image, label in outputs:
        assert image.shape == (4, *PATCH) and image.dtype == torch.float32 and image.isfinite().all()
        assert label.shape == PATCH and label.dtype == torch.uint8
        assert set(label.unique().tolist()) <= {0, 1, 2, 3}
