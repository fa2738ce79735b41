"""Validation Dice: known answers, the empty-class rule, and a sliding-window oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.common.metrics import metric_name
from pipeline.train.validation import ValidationTask, dice_per_class, format_summary, summarise, validate


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as each training worker has; more only thrash on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_dice_of_built_masks() -> None:
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1  # 32 voxels
    prediction = np.zeros_like(truth)
    prediction[1:3] = 1  # 32 voxels, 16 shared
    assert dice_per_class(prediction, truth, 2) == [pytest.approx(0.5)]


def test_empty_rule() -> None:
    """The evaluate stage's rule (nnU-Net's): absent from both is NaN (left out of means); false
    positives on an empty reference and a missed class are 0."""
    empty = np.zeros((2, 2, 2), np.uint8)
    one = empty.copy()
    one[0, 0, 0] = 1
    assert math.isnan(dice_per_class(empty, empty, 2)[0])
    assert dice_per_class(one, empty, 2) == [0.0]
    assert dice_per_class(empty, one, 2) == [0.0]


def test_summary_keys_and_nan_handling() -> None:
    tasks = [ValidationTask(0, "Liver", {0: "background", 1: "liver", 2: "tumour"}, ("a", "b")),
             ValidationTask(1, "Prostate MR", {0: "background", 1: "peripheral zone"}, ("c",))]
    per_case = {"Liver": [[0.9, float("nan")], [0.7, 0.4]], "Prostate MR": [[0.6]]}
    metrics = summarise(per_case, tasks)
    assert metrics["dice/Liver/liver"] == pytest.approx(0.8)
    assert metrics["dice/Liver/tumour"] == pytest.approx(0.4)
    assert metrics["dice/Liver/mean"] == pytest.approx(0.6)
    assert metrics["dice/Prostate_MR/peripheral_zone"] == pytest.approx(0.6)
    assert metrics["dice/mean"] == pytest.approx(0.6)
    assert "Liver 0.600" in format_summary(metrics)
    assert metric_name("non-enhancing tumour") == "non-enhancing_tumour"


class ThresholdNet(nn.Module):
    """Predicts class 1 where the first channel is > 0.5 (an oracle when the image is the label)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor, task_ids) -> list[torch.Tensor]:
        foreground = self.scale * (x[:, :1] - 0.5)
        return [torch.cat([-foreground, foreground], dim=1)]


def test_validate_with_an_oracle_scores_one() -> None:
    labels = {}
    for i, case in enumerate(("c0", "c1")):
        label = np.zeros((12, 20, 20), np.uint8)
        label[2 + i : 8, 5:15, 3:12] = 1
        labels[case] = label
    task = ValidationTask(0, "Toy", {0: "background", 1: "thing"}, ("c0", "c1"))

    def read_case(task_id: int, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        return labels[case_id][None].astype(np.float32), labels[case_id]

    metrics = validate(ThresholdNet(), [task], read_case, (8, 16, 16))
    assert metrics == {"dice/Toy/thing": 1.0, "dice/Toy/mean": 1.0, "dice/mean": 1.0}
    # A rank only validates its share of the cases (here: without a process group, 1 of 2).
    assert validate(ThresholdNet(), [task], read_case, (8, 16, 16), rank=1, world_size=2)["dice/mean"] == 1.0
