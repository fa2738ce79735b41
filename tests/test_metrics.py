"""Known answers of the per-class metrics on hand-made masks (and the empty-mask rules)."""

import math

import numpy as np
import pytest

from pipeline.common.metrics import class_metrics, dice, hd95


def _volume(*boxes: tuple[int, tuple[slice, slice, slice]], shape: tuple[int, int, int] = (10, 12, 14)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    for value, box in boxes:
        labels[box] = value
    return labels


def test_dice_of_overlapping_cubes() -> None:
    reference = _volume((1, np.s_[2:5, 2:5, 2:5]))  # 27 voxels
    prediction = _volume((1, np.s_[3:6, 2:5, 2:5]))  # 27 voxels, 18 shared
    assert dice(prediction, reference, 1) == pytest.approx(2 * 18 / 54)
    assert dice(reference, reference, 1) == 1.0
    assert dice(_volume((1, np.s_[7:9, 7:9, 7:9])), reference, 1) == 0.0


def test_hd95_of_parallel_plates_uses_spacing() -> None:
    """Two one-voxel-thick plates 3 slices apart: every surface distance is 3 x the z spacing."""
    reference = _volume((1, np.s_[2, :, :]))
    prediction = _volume((1, np.s_[5, :, :]))
    assert hd95(prediction, reference, 1, (2.5, 1.0, 1.0)) == pytest.approx(7.5)
    assert hd95(prediction, reference, 1, (1.0, 1.0, 1.0)) == pytest.approx(3.0)


def test_hd95_of_single_voxels_and_of_identical_masks() -> None:
    reference = _volume((2, np.s_[1, 1, 1]))
    prediction = _volume((2, np.s_[1, 4, 5]))  # 3 voxels in y and 4 in x away
    assert hd95(prediction, reference, 2, (1.0, 2.0, 1.5)) == pytest.approx(math.hypot(3 * 2.0, 4 * 1.5))
    assert hd95(reference, reference, 2, (1.0, 1.0, 1.0)) == 0.0


def test_empty_mask_rules() -> None:
    """nnU-Net (default): Dice 0 for false positives on an empty reference, NaN only when both are
    empty; MONAI ignore_empty: NaN whenever the reference lacks the class. HD95 NaN when either
    mask is empty."""
    empty = _volume()
    cube = _volume((1, np.s_[2:5, 2:5, 2:5]))
    assert math.isnan(dice(empty, empty, 1)) and math.isnan(dice(empty, empty, 1, "monai"))
    assert dice(cube, empty, 1) == 0.0  # false positives on an empty reference count (nnU-Net)
    assert math.isnan(dice(cube, empty, 1, "monai"))  # ... or are not scored (MONAI)
    assert dice(empty, cube, 1) == 0.0 == dice(empty, cube, 1, "monai")  # a missed class scores 0
    with pytest.raises(ValueError, match="empty-reference rule"):
        dice(cube, cube, 1, "other")  # type: ignore[arg-type]
    assert math.isnan(hd95(empty, cube, 1, (1.0, 1.0, 1.0)))
    assert math.isnan(hd95(cube, empty, 1, (1.0, 1.0, 1.0)))


def test_class_metrics_per_foreground_class_with_counts() -> None:
    reference = _volume((1, np.s_[2:5, 2:5, 2:5]), (2, np.s_[6:8, 6:8, 6:8]))
    prediction = _volume((1, np.s_[2:5, 2:5, 2:5]))
    labels = {0: "bg", 1: "liver", 2: "tumour", 3: "cyst"}
    liver, tumour, absent = class_metrics(prediction, reference, labels, (1, 1, 1))
    assert (liver.name, liver.dice, liver.hd95) == ("liver", 1.0, 0.0)
    assert (liver.reference_voxels, liver.predicted_voxels) == (27, 27)
    assert tumour.dice == 0.0 and math.isnan(tumour.hd95) and tumour.reference_voxels == 8
    assert (tumour.false_positives, tumour.false_negatives) == (0, 8)
    assert absent.class_id == 3 and math.isnan(absent.dice)
    shifted = _volume((1, np.s_[3:6, 2:5, 2:5]), (3, np.s_[0, 0, 0:2]))  # 18 of 27 liver voxels shared
    liver, _, cyst = class_metrics(shifted, reference, labels, (1, 1, 1))
    assert (liver.dice, liver.false_positives, liver.false_negatives) == (pytest.approx(36 / 54), 9, 9)
    assert (cyst.dice, cyst.false_positives, cyst.false_negatives) == (0.0, 2, 0)  # nnU-Net rule
    assert math.isnan(class_metrics(shifted, reference, labels, (1, 1, 1), empty="monai")[2].dice)


def test_class_metrics_errors() -> None:
    with pytest.raises(ValueError, match="prediction shape"):
        class_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), {0: "bg", 1: "a"}, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        class_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), {0: "bg", 1: "a"}, (1, 1))
