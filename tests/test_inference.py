import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from model.presets import PRESETS
from pipeline.common import inference
from pipeline.common.inference import (
    InferenceOptions,
    label_map,
    predict_probabilities,
    predict_scan,
)
from pipeline.common.model_card import ModelCard, TaskCard, build_from_card


class PointwiseNet(nn.Module):
    """Logits = the input channels (+1 on class 0): a known answer for any tiling."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, task_ids) -> list[torch.Tensor]:
        return [x + x.new_tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1, 1) + self.anchor]


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("mirror_axes", [(), (0, 1, 2)])
def test_sliding_window_known_answer(overlap: float, mirror_axes: tuple[int, ...]) -> None:
    image = torch.randn(3, 21, 37, 30, generator=torch.Generator().manual_seed(0))
    options = InferenceOptions(overlap=overlap, mirror_axes=mirror_axes)
    probabilities = predict_probabilities(PointwiseNet(), image, 0, 3, (8, 16, 16), options)
    expected = torch.softmax(image + torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1, 1), dim=0)
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-5)


def test_label_map_crops_classes_and_handles_small_images() -> None:
    image = torch.zeros(3, 4, 5, 6)
    image[1, 2, 3, 4] = 10.0
    labels = label_map(predict_probabilities(PointwiseNet(), image, 0, 2, (8, 16, 16)))
    assert labels.shape == (4, 5, 6) and labels.dtype == torch.uint8
    assert labels[2, 3, 4] == 1 and labels.sum() == 1


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="overlap must be in"):
        InferenceOptions(overlap=1.0)
    with pytest.raises(ValueError, match="mirror_axes"):
        InferenceOptions(mirror_axes=(3,))
    with pytest.raises(ValueError, match="window_batch_size"):
        InferenceOptions(window_batch_size=0)


class ConvNet(nn.Module):
    """A 3x3x3 convolution: window borders matter, so blending must be done right."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, task_ids) -> list[torch.Tensor]:
        return [self.conv(x)]


def test_gaussian_blend_of_a_convolution_matches_monai_called_directly() -> None:
    """Our predictor (softmax, task id, class crop) through MONAI's tiler and nnU-Net's sigma."""
    network = ConvNet().eval()
    image = torch.randn(1, 30, 37, 21, generator=torch.Generator().manual_seed(1))
    ours = predict_probabilities(network, image, 0, 2, (16, 16, 16), InferenceOptions(window_batch_size=4))
    theirs = sliding_window_inference(
        image[None], (16, 16, 16), 4, lambda x: torch.softmax(network(x, 0)[0][:, :2], 1), overlap=0.5,
        mode="gaussian", sigma_scale=0.125,
    )[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


class RecordingNet(PointwiseNet):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor, task_ids) -> list[torch.Tensor]:
        self.shapes.append(tuple(x.shape))
        return super().forward(x, task_ids)


def test_network_only_sees_batches_of_windows() -> None:
    """Memory bound: one window batch at a time reaches the network, mirrored copies included."""
    network = RecordingNet()
    options = InferenceOptions(window_batch_size=3, mirror_axes=(0, 2))
    predict_probabilities(network, torch.zeros(3, 40, 40, 40), 0, 3, (16, 16, 16), options)
    windows = 4**3  # per axis 0, 8, 16, 24 (40 voxels, patch 16, overlap 0.5)
    assert all(shape[0] <= 3 and shape[2:] == (16, 16, 16) for shape in network.shapes)
    assert sum(shape[0] for shape in network.shapes) == 4 * windows  # 4 mirrorings of every window


def test_predict_scan_returns_the_input_grid() -> None:
    """A raw LPS image with anisotropic voxels: labels, probabilities and foreground on its own grid."""
    window = {"scheme": "ct-window", "lower": -325.0, "upper": 325.0}
    task = TaskCard("t", {0: "bg", 1: "a", 2: "b"}, ("CT",), (2.0, 2.0, 2.0), (window,))
    card = ModelCard(PRESETS["tiny"].replace(patch_size=(16, 32, 32)), (task,))
    affine = np.diag([-1.5, -1.5, 4.0, 1.0])  # LPS, 1.5 x 1.5 x 4 mm
    image = np.random.default_rng(0).normal(0, 100, (1, 30, 26, 9)).astype(np.float32)
    network = build_from_card(card).eval()
    prediction = predict_scan(network, card, 0, image, affine, probabilities=True, foreground=True)
    assert prediction.labels.shape == (30, 26, 9) and prediction.labels.dtype == np.uint8
    assert prediction.probabilities.shape == (3, 30, 26, 9)
    np.testing.assert_allclose(prediction.probabilities.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(prediction.foreground, 1 - prediction.probabilities[0], atol=1e-6)
    with pytest.raises(ValueError, match="2 channel"):
        predict_scan(network, card, 0, np.zeros((2, 30, 26, 9), np.float32), affine)


@pytest.mark.parametrize("order", [1, 3])
def test_predict_scan_resamples_with_the_cards_image_order(order: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The raw image is resampled as ingest resampled the task's training images."""
    seen = []
    real = inference.preprocess_image

    def recording(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(inference, "preprocess_image", recording)
    task = TaskCard("t", {0: "bg", 1: "a"}, ("MR",), (2.0, 2.0, 2.0), ({"scheme": "zscore"},), image_order=order)
    card = ModelCard(PRESETS["tiny"].replace(patch_size=(16, 32, 32)), (task,))
    predict_scan(build_from_card(card).eval(), card, 0, np.ones((1, 20, 20, 10), np.float32), np.eye(4))
    assert seen == [order]
