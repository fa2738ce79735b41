"""Example slices: what the scores look like. For a few cases per task, the axial slice with the
most reference foreground: image, reference and prediction side by side (store grid)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from pipeline.common.metrics import metric_name


@dataclass(frozen=True)
class SliceExample:
    case: str
    z: int
    image: np.ndarray  # (y, x), first channel
    reference: np.ndarray  # (y, x) labels
    prediction: np.ndarray  # (y, x) labels


def pick_slice(case: str, image: np.ndarray, reference: np.ndarray, prediction: np.ndarray) -> SliceExample:
    """The z slice holding the most reference foreground (the middle one when there is none)."""
    foreground = (reference > 0).sum(axis=(1, 2))
    z = int(foreground.argmax()) if foreground.any() else reference.shape[0] // 2
    return SliceExample(case, z, np.asarray(image[0, z], np.float32), reference[z].copy(), prediction[z].copy())


def write_slices(examples: Mapping[str, Sequence[SliceExample]], labels: Mapping[str, Mapping[int, str]],
                 folder: Path) -> list[Path]:
    """`slices_<task>.png` per task: a row per case, columns image / reference / prediction."""
    written = []
    for task, rows in examples.items():
        colours = _label_colours(len(labels[task]))
        fig = Figure(figsize=(9, 3 * len(rows)))
        axes = fig.subplots(len(rows), 3, squeeze=False)
        for row, example in zip(axes, rows):
            row[0].imshow(example.image, cmap="gray")
            row[0].set_ylabel(f"{example.case}\nz={example.z}")
            for ax, layer in ((row[1], example.reference), (row[2], example.prediction)):
                ax.imshow(example.image, cmap="gray")
                ax.imshow(np.ma.masked_equal(layer, 0), cmap=colours, vmin=0, vmax=len(labels[task]) - 1,
                          alpha=0.5, interpolation="nearest")
        for ax, title in zip(axes[0], ("image", "reference", "prediction")):
            ax.set_title(title)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        names = ", ".join(f"{c}: {name}" for c, name in sorted(labels[task].items()) if c)
        fig.suptitle(f"{task} ({names})")
        fig.tight_layout()
        path = folder / f"slices_{metric_name(task)}.png"
        fig.savefig(path, dpi=80)
        written.append(path)
    return written


def _label_colours(num_classes: int) -> ListedColormap:
    return ListedColormap(colormaps["tab10"].colors[: max(num_classes, 2)])
