import pytest
import torch
from torch import nn

from pipeline.common.inference import InferenceOptions, predict_probabilities, segment


class PointwiseNet(nn.Module):
    """Logits = the input channels (+1 on class 0): a known answer for any tiling."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, task_ids) -> list[torch.Tensor]:
        return [x + torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1, 1) + self.anchor]


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("mirror_axes", [(), (0, 1, 2)])
def test_sliding_window_known_answer(overlap: float, mirror_axes: tuple[int, ...]) -> None:
    image = torch.randn(3, 21, 37, 30, generator=torch.Generator().manual_seed(0))
    options = InferenceOptions(overlap=overlap, mirror_axes=mirror_axes)
    probabilities = predict_probabilities(PointwiseNet(), image, 0, 3, (8, 16, 16), options)
    expected = torch.softmax(image + torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1, 1), dim=0)
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-5)


def test_segment_crops_classes_and_handles_small_images() -> None:
    image = torch.zeros(3, 4, 5, 6)
    image[1, 2, 3, 4] = 10.0
    labels = segment(PointwiseNet(), image, 0, 2, (8, 16, 16))
    assert labels.shape == (4, 5, 6) and labels.dtype == torch.uint8
    assert labels[2, 3, 4] == 1 and labels.sum() == 1


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="overlap must be in"):
        InferenceOptions(overlap=1.0)
    with pytest.raises(ValueError, match="mirror_axes"):
        InferenceOptions(mirror_axes=(3,))
