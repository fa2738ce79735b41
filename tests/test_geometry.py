import nibabel as nib
import numpy as np
import pytest

from pipeline.common import geometry as geo
from pipeline.common.intensity import (
    IntensityStats,
    ct_clip_zscore,
    ct_window,
    intensity_stats,
    normalize,
    zscore,
)

LPS = np.diag([-2.0, -3.0, 4.0, 1.0])
# File axes hold (z, x, y) of the patient: axis 0 runs Inferior->Superior, etc.
PERMUTED = np.array([[0, 0.5, 0, 10], [0, 0, 0.7, -5], [3.0, 0, 0, 1], [0, 0, 0, 1]])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _ellipsoids(shape: tuple[int, int, int]) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    radius = np.array(shape, dtype=np.float32)[:, None, None, None] / 3
    dist = (((grid - centre) / radius) ** 2).sum(0)
    label = (dist < 1).astype(np.uint8)
    label[dist < 0.3] = 2
    return label


def test_to_canonical_flips_lps_and_orders_zyx() -> None:
    data = np.zeros((1, 4, 5, 6))
    data[0, 0, 0, 0] = 1
    out = geo.to_canonical(data, LPS)
    # L->R flip puts x=0 at x=3, P->A flip puts y=0 at y=4; z unchanged; axes reversed.
    assert out.shape == (1, 6, 5, 4)
    assert out[0, 0, 4, 3] == 1
    assert geo.spacing_zyx(LPS) == (4.0, 3.0, 2.0)


def test_permuted_axes_spacing_and_inverse() -> None:
    data = np.random.default_rng(0).random((1, 3, 4, 5))
    out = geo.to_canonical(data, PERMUTED)
    # canonical x <- file axis 1 (0.5 mm), y <- axis 2 (0.7 mm), z <- axis 0 (3 mm)
    assert out.shape == (1, 3, 5, 4)
    assert geo.spacing_zyx(PERMUTED) == (3.0, 0.7, 0.5)
    np.testing.assert_array_equal(geo.from_canonical(out[0], PERMUTED), data[0])


def test_nifti_channels_from_4d_or_channel_files() -> None:
    data = np.random.default_rng(0).random((4, 5, 6, 2)).astype(np.float32)
    four_d, affine = geo.nifti_channels([nib.Nifti1Image(data, LPS)])
    files, _ = geo.nifti_channels([nib.Nifti1Image(data[..., c], LPS) for c in range(2)])
    assert four_d.shape == (2, 4, 5, 6) and np.array_equal(four_d, files) and np.array_equal(affine, LPS)
    with pytest.raises(ValueError, match="channel images differ"):
        geo.nifti_channels([nib.Nifti1Image(data[..., 0], LPS), nib.Nifti1Image(data[..., 0], np.eye(4))])


def test_volume_problem_needs_3d_and_an_invertible_finite_affine() -> None:
    sheared = LPS + np.array([[0, 1.0, 0, 0], [0] * 4, [0] * 4, [0] * 4])  # sheared, still invertible
    for affine in (LPS, PERMUTED, sheared):
        assert geo.volume_problem((8, 8, 8), affine) is None
    assert geo.volume_problem((8, 8, 1), LPS).startswith("2D image of shape (8, 8, 1)")
    flat = LPS @ np.diag([1.0, 1.0, 0.0, 1.0])
    assert geo.volume_problem((8, 8, 8), flat).startswith("singular affine (voxel sizes 2, 3, 0 mm")
    parallel = LPS.copy()
    parallel[:3, 1] = [2.0, 0.0, 1e-9]  # the y axis along the x axis: no zero size, still singular
    assert geo.volume_problem((8, 8, 8), parallel).startswith("singular affine (voxel sizes 2, 2, 4 mm")
    nan = LPS.copy()
    nan[1, 3] = np.nan
    assert geo.volume_problem((8, 8, 8, 2), nan).startswith("affine holds NaN or infinite values")


def test_bounding_box_and_crop() -> None:
    mask = np.zeros((5, 6, 7), dtype=bool)
    mask[1:3, 2, 3:6] = True
    box = geo.bounding_box(mask)
    assert box == ((1, 3), (2, 3), (3, 6))
    assert geo.crop(np.ones((2, 5, 6, 7)), box).shape == (2, 2, 1, 3)
    assert geo.bounding_box(np.zeros((2, 3, 4), dtype=bool)) == ((0, 2), (0, 3), (0, 4))


def test_resampled_shape_keeps_extent() -> None:
    assert geo.resampled_shape((10, 20, 30), (2.5, 1.0, 1.0), (1.25, 2.0, 1.0)) == (20, 10, 30)


@pytest.mark.parametrize("affine", [LPS, PERMUTED, np.diag([1.0, 1.0, 2.5, 1.0])])
def test_round_trip_without_resampling_is_exact(affine: np.ndarray) -> None:
    label = _ellipsoids((20, 24, 16))
    image = np.where(label > 0, 100.0, 0.0)[np.newaxis] + 1.0 * (label > -1)
    image[0, :2] = 0  # a zero border to crop
    out, stored, meta = geo.preprocess_case(image, affine, label, geo.spacing_zyx(affine), (zscore(),))
    assert stored.shape == out.shape[1:] == meta.shape
    assert meta.crop_box != tuple((0, n) for n in meta.canonical_shape)
    restored = geo.restore_label(stored, meta)
    np.testing.assert_array_equal(np.asarray(restored.dataobj), label)
    np.testing.assert_array_equal(restored.affine, affine)


# Per-class linear smooths the masks (that is its purpose), so its round trip is looser.
@pytest.mark.parametrize(("mode", "min_dice"), [("nearest", 0.99), ("per-class-linear", 0.98)])
def test_round_trip_with_resampling(mode: str, min_dice: float) -> None:
    label = _ellipsoids((40, 40, 16))
    image = (label > -1).astype(np.float32)[np.newaxis]
    affine = np.diag([-1.0, -1.0, 3.0, 1.0])
    _, stored, meta = geo.preprocess_case(image, affine, label, (1.5, 0.8, 0.8), (zscore(),), 1, mode)
    assert meta.shape == (32, 50, 50)
    restored = np.asarray(geo.restore_label(stored, meta).dataobj)
    for c in (1, 2):
        assert _dice(restored == c, label == c) >= min_dice


def test_preprocess_image_matches_case_image() -> None:
    label = _ellipsoids((12, 10, 8))
    image = np.stack([label * 3.0 + 1, label * -2.0 + 5])
    full, _, meta = geo.preprocess_case(image, LPS, label, (3.0, 2.0, 2.0), (zscore(), zscore()))
    alone, meta_alone = geo.preprocess_image(image, LPS, (3.0, 2.0, 2.0), (zscore(), zscore()))
    np.testing.assert_array_equal(full, alone)
    assert meta == meta_alone
    assert geo.CaseMeta.from_dict(meta.to_dict()) == meta


def test_restore_rejects_wrong_shape() -> None:
    _, meta = geo.preprocess_image(np.ones((1, 4, 4, 4)), np.eye(4), (1.0, 1.0, 1.0), (zscore(),))
    with pytest.raises(ValueError, match="shape"):
        geo.restore_array(np.zeros((3, 4, 4)), meta)


def test_ct_window_hand_computed() -> None:
    image = np.array([[-1000.0, -325.0, 0.0, 325.0, 2000.0]])
    out = normalize(image, (ct_window(),), np.ones(5, dtype=bool))
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.5, 1.0, 1.0]])
    assert out.dtype == np.float32


def test_ct_clip_zscore_hand_computed() -> None:
    norm = ct_clip_zscore(IntensityStats(mean=10.0, std=5.0, percentile_00_5=0.0, percentile_99_5=30.0))
    out = normalize(np.array([[-50.0, 10.0, 20.0, 99.0]]), (norm,), np.ones(4, dtype=bool))
    np.testing.assert_allclose(out, [[-2.0, 0.0, 2.0, 4.0]])


def test_zscore_uses_mask_and_zeroes_outside() -> None:
    channel = np.array([[0.0, 2.0, 4.0, 6.0]])
    mask = np.array([False, True, True, True])
    out = normalize(channel, (zscore(),), mask)
    np.testing.assert_allclose(out[0], [0.0, -np.sqrt(1.5), 0.0, np.sqrt(1.5)], rtol=1e-6)


def test_intensity_stats() -> None:
    stats = intensity_stats(np.arange(1001, dtype=np.float64))
    assert (stats.mean, stats.percentile_00_5, stats.percentile_99_5) == (500.0, 5.0, 995.0)
    with pytest.raises(ValueError, match="no foreground"):
        intensity_stats(np.array([]))


# --- nnU-Net's separate-z rule and probability restoration -----------------------------------


@pytest.mark.parametrize(
    ("current", "new", "axis"),
    [
        ((5.0, 1.0, 1.0), (5.0, 1.0, 1.0), 0),  # thick slices
        ((1.0, 1.0, 1.0), (1.0, 4.0, 1.0), 1),  # the target is anisotropic
        ((3.0, 1.0, 1.0), (1.0, 1.0, 1.0), None),  # ratio 3 is not above 3
        ((5.0, 5.0, 1.0), (1.0, 1.0, 1.0), None),  # two coarsest axes: no separate one
    ],
)
def test_separate_axis_follows_nnunet(current, new, axis) -> None:
    assert geo.separate_axis(current, new) == axis


def test_separate_axis_is_resampled_by_nearest_neighbour() -> None:
    """z is copied slice for slice (order 0) while x is interpolated linearly."""
    volume = (np.arange(4)[:, None, None] * 100.0 + np.arange(6)[None, None, :] * np.ones((1, 5, 1))).astype(np.float32)
    out = geo.resize(volume, (8, 5, 12), order=1, axis=0)
    np.testing.assert_array_equal(out[:, 2, 5], [0, 0, 100, 100, 200, 200, 300, 300] + out[0, 2, 5])
    np.testing.assert_allclose(out[0, 2, 1:11], 0.5 * np.arange(1, 11) - 0.25, atol=1e-5)  # x = (x' + 0.5) / 2 - 0.5
    blurred = geo.resize(volume, (8, 5, 12), order=1)
    assert blurred[1, 2, 5] != blurred[0, 2, 5]  # without the rule, z would be interpolated


def _anisotropic_meta() -> geo.CaseMeta:
    """Original grid (z, y, x) = (8, 20, 20) at (5, 1, 1) mm; stored (4, 10, 10) at (10, 2, 2) mm."""
    affine = np.diag([1.0, 1.0, 5.0, 1.0])
    return geo.CaseMeta(
        original_affine=tuple(tuple(float(v) for v in row) for row in affine),
        original_shape=(20, 20, 8), original_axcodes=("R", "A", "S"), original_spacing=(5.0, 1.0, 1.0),
        canonical_shape=(8, 20, 20), crop_box=((0, 8), (0, 20), (0, 20)), spacing=(10.0, 2.0, 2.0), shape=(4, 10, 10),
    )


def test_probabilities_go_back_linearly_with_the_separate_z_rule() -> None:
    """P(fg) rises linearly in x and crosses 0.5 at stored x = 4.8, in stored slices z >= 2 only.

    Linear resampling puts the boundary at original x = 2 * 4.8 + 0.5 = 10.1, so the labels are
    x >= 11 in original slices z >= 4 (z by nearest neighbour); the argmax taken on the stored grid
    and copied back would give x >= 10.
    """
    meta = _anisotropic_meta()
    x = np.arange(10, dtype=np.float32)
    foreground = np.zeros((4, 10, 10), np.float32) + 0.05
    foreground[2:] = 0.5 + (x - 4.8) / 10
    probabilities = np.stack([1 - foreground, foreground])
    labels, kept = geo.restore_probabilities(probabilities, meta, keep=(1,), dtype=np.float16)
    expected = np.zeros((20, 20, 8), np.uint8)  # (x, y, z) as in the file
    expected[11:, :, 4:] = 1
    np.testing.assert_array_equal(labels, expected)
    assert kept[1].dtype == np.float16 and kept[1].shape == (20, 20, 8)
    np.testing.assert_array_equal(kept[1][:, :, 3], np.float16(0.05))  # z nearest: no blending of slices 1 and 2
    nearest = geo.restore_array(probabilities.argmax(0).astype(np.uint8), meta, order=0)
    assert nearest[10, 0, 4] == 1 and labels[10, 0, 4] == 0


def test_restored_probabilities_outside_the_crop_box_are_background() -> None:
    meta = dataclasses_replace(_anisotropic_meta(), canonical_shape=(10, 20, 20), crop_box=((2, 10), (0, 20), (0, 20)),
                               original_shape=(20, 20, 10))
    probabilities = np.stack([np.zeros((4, 10, 10), np.float32), np.ones((4, 10, 10), np.float32)])
    labels, kept = geo.restore_probabilities(probabilities, meta, keep=(0, 1))
    assert labels[:, :, :2].max() == 0 and labels[:, :, 2:].min() == 1
    assert kept[0][:, :, :2].min() == 1.0 and kept[1][:, :, :2].max() == 0.0
    with pytest.raises(ValueError, match="probabilities shape"):
        geo.restore_probabilities(probabilities[:, :3], meta)


def dataclasses_replace(meta: geo.CaseMeta, **changes) -> geo.CaseMeta:
    import dataclasses

    return dataclasses.replace(meta, **changes)
