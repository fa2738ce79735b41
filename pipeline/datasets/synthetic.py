"""Synthetic multi-task segmentation datasets in the Decathlon (MSD) or nnU-Net v2 raw layout.

Pure numpy + nibabel, deterministic by seed, small enough for CPU tests. Each task draws its
anatomy from one of three generators, chosen by its channels:

- any "CT" channel -> abdomen: body in air, one organ (label 1) and lesion types (labels 2..)
  inside it, intensities in HU (a "PET" channel renders uptake in the same anatomy);
- 4 or more MR channels -> brain tumour: skull-stripped brain, edema / non-enhancing core /
  enhancing rim (BraTS-like; fewer classes merge the inner ones);
- 1 to 3 MR channels -> pelvis: prostate with peripheral (1) and transition (2) zones and a
  bladder that is not labelled.

Shapes, positions and intensities change per case. `SyntheticTask.shape` and `spacing` are in
canonical RAS order; case i is saved with orientation `ORIENTATIONS[i % 3]` (RAS, flipped LPS,
permuted ASL), the affine always describing the same physical anatomy.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

log = logging.getLogger(__name__)

Layout = Literal["msd", "nnunetv2"]
ORIENTATIONS = ("RAS", "LPS", "ASL")
_EDGE = 0.04  # soft-edge width of a blob, in units of its radius
_MAX_TRIES = 20


def modality_type(channel: str) -> Literal["CT", "MR", "PET"]:
    """Modality type of a channel name as MSD writes it ("T2", "ADC", "FLAIR" are MR)."""
    name = channel.upper()
    if name == "CT":
        return "CT"
    if name in ("PET", "PT"):
        return "PET"
    return "MR"


def anatomy(task: SyntheticTask) -> Literal["abdomen", "brain", "pelvis"]:
    """Which generator draws the task (see the module docstring)."""
    types = {modality_type(m) for m in task.modalities}
    if "CT" in types:
        return "abdomen"
    return "brain" if len(task.modalities) >= 4 else "pelvis"


_MAX_CLASSES = {"abdomen": 6, "brain": 4, "pelvis": 3}


@dataclass(frozen=True)
class SyntheticTask:
    """One synthetic dataset; shape (x, y, z) voxels and spacing (mm) in RAS order."""

    name: str
    modalities: tuple[str, ...]
    labels: tuple[str, ...]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    num_cases: int = 6
    num_test_cases: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not self.modalities:
            problems.append("modalities is empty")
        if len(self.labels) < 2 or self.labels[0] != "background":
            problems.append(f"labels must start with 'background' and name >= 1 class, got {self.labels}")
        if len(self.shape) != 3 or min(self.shape) < 16:
            problems.append(f"shape must be 3 sizes >= 16, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            problems.append(f"spacing must be 3 positive sizes, got {self.spacing}")
        if self.num_cases < 1 or self.num_test_cases < 0:
            problems.append(f"need num_cases >= 1 and num_test_cases >= 0, got {self.num_cases}, {self.num_test_cases}")
        limit = _MAX_CLASSES[anatomy(self)]
        if len(self.labels) > limit:
            problems.append(f"{anatomy(self)} anatomy supports at most {limit} labels, got {len(self.labels)}")
        if problems:
            raise ValueError(f"SyntheticTask {self.name!r}: " + "; ".join(problems))

    @property
    def case_prefix(self) -> str:
        """Case names are `<prefix>_<index:03d>`, e.g. Task01_SynthLiver -> synthliver_000."""
        return self.name.split("_", 1)[-1].lower()


DEFAULT_TASKS: tuple[SyntheticTask, ...] = (
    SyntheticTask("Task01_SynthLiver", ("CT",), ("background", "liver", "tumour"),
                  spacing=(1.5, 1.5, 5.0), shape=(64, 64, 32), num_test_cases=2),
    SyntheticTask("Task02_SynthSpleen", ("CT",), ("background", "spleen"),
                  spacing=(2.0, 2.0, 3.0), shape=(56, 56, 40), num_test_cases=1),
    SyntheticTask("Task03_SynthProstate", ("T2", "ADC"),
                  ("background", "peripheral zone", "transition zone"),
                  spacing=(1.25, 1.25, 3.6), shape=(64, 64, 24), num_test_cases=1),
    SyntheticTask("Task04_SynthBrainTumour", ("FLAIR", "T1w", "T1gd", "T2w"),
                  ("background", "edema", "non-enhancing tumour", "enhancing tumour"),
                  spacing=(2.0, 2.0, 2.0), shape=(48, 56, 48), num_test_cases=1),
)


@dataclass(frozen=True)
class SyntheticCase:
    """One case in canonical RAS order; `orientation` is the axis code it is saved with."""

    image: np.ndarray  # (x, y, z, channels)
    label: np.ndarray  # (x, y, z) uint8
    affine: np.ndarray  # 4x4 RAS affine of image and label
    orientation: str


# --- geometry -------------------------------------------------------------------------------

def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """World coordinates (mm) of every voxel relative to the field-of-view centre: (3, x, y, z)."""
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """Random rotation: about z by up to max_angle, small tilts about x and y."""
    a, b, c = rng.uniform(-1, 1, 3) * (max_angle, max_angle / 3, max_angle / 3)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return (rz @ rx @ ry).astype(np.float32)


def _blob(grid: np.ndarray, center: np.ndarray, radii: np.ndarray, rng: np.random.Generator,
          wobble: float = 0.12, max_angle: float = 0.5) -> np.ndarray:
    """Signed shape function of a smooth random blob: < 0 inside, about -1 at its centre."""
    local = np.tensordot(_rotation(rng, max_angle), grid - center.reshape(3, 1, 1, 1), axes=1)
    scaled = local / np.asarray(radii, dtype=np.float32).reshape(3, 1, 1, 1)
    f = np.sqrt((scaled**2).sum(axis=0)) - 1
    for _ in range(3):
        freq = rng.normal(size=3).astype(np.float32) * 2
        f += wobble / 3 * np.sin(np.tensordot(freq, scaled, axes=1) + rng.uniform(0, 2 * np.pi))
    return f


def _soft(f: np.ndarray) -> np.ndarray:
    """Partial-volume weight of a blob: 0.5 on its label boundary f = 0."""
    return 1 / (1 + np.exp(np.clip(f / _EDGE, -50, 50)))


def _point_inside(f: np.ndarray, grid: np.ndarray, depth: float, rng: np.random.Generator) -> np.ndarray:
    """A random voxel position (mm) where f < -depth (deep inside a blob)."""
    candidates = np.argwhere(f < -depth)
    if len(candidates) == 0:
        candidates = np.argwhere(f <= f.min())
    i, j, k = candidates[rng.integers(len(candidates))]
    return grid[:, i, j, k]


# --- anatomies: each returns painted tissue layers (name, weight) and the full label map -----

Layers = list[tuple[str, np.ndarray]]


def _abdomen(grid: np.ndarray, half: np.ndarray, n_classes: int, style: np.random.Generator,
             rng: np.random.Generator) -> tuple[Layers, np.ndarray]:
    side = style.choice((-1.0, 1.0))
    body = _blob(grid, half * rng.uniform(-0.05, 0.05, 3) * (1, 1, 0),
                 half * (rng.uniform(0.8, 0.9), rng.uniform(0.6, 0.7), 10), rng, wobble=0.05, max_angle=0.1)
    center = half * (side * style.uniform(0.2, 0.3) + rng.uniform(-0.05, 0.05),
                     rng.uniform(-0.1, 0.1), rng.uniform(-0.2, 0.2))
    radii = half * style.uniform((0.4, 0.35, 0.5), (0.5, 0.45, 0.6)) * rng.uniform(0.85, 1.15, 3)
    organ = np.maximum(_blob(grid, center, radii, rng), body)
    label = (organ < 0).astype(np.uint8)
    layers = [("body", _soft(body)), ("organ", _soft(organ))]
    for cls in range(2, n_classes):
        for _ in range(rng.integers(1, 3)):
            lesion_center = _point_inside(organ, grid, 0.4, rng)
            lesion_radii = radii * rng.uniform(0.3, 0.45) * rng.uniform(0.8, 1.2, 3)
            lesion = np.maximum(_blob(grid, lesion_center, lesion_radii, rng, wobble=0.2), organ)
            label[lesion < 0] = cls
            layers.append((f"lesion{cls - 1}", _soft(lesion)))
    return layers, label


def _pelvis(grid: np.ndarray, half: np.ndarray, n_classes: int, style: np.random.Generator,
            rng: np.random.Generator) -> tuple[Layers, np.ndarray]:
    body = _blob(grid, np.zeros(3, np.float32), half * (rng.uniform(0.85, 0.95), rng.uniform(0.7, 0.8), 10),
                 rng, wobble=0.05, max_angle=0.1)
    center = half * (rng.uniform(-0.1, 0.1), rng.uniform(-0.25, -0.1), rng.uniform(-0.25, 0.05))
    radii = half * (0.38, 0.32, 0.5) * rng.uniform(0.8, 1.2, 3)
    gland = _blob(grid, center, radii, rng, max_angle=0.3)
    inner = np.maximum(_blob(grid, center + radii * (0, 0.3, 0), radii * 0.6, rng, max_angle=0.3), gland)
    bladder_center = center + half * (rng.uniform(-0.1, 0.1), 0.1, 0.0) + radii * (0, 0, 1.6)
    bladder = _blob(grid, bladder_center, half * rng.uniform(0.25, 0.35, 3), rng, wobble=0.1)
    label = np.where(gland < 0, 1, 0).astype(np.uint8)
    label[inner < 0] = 2
    layers = [("body", _soft(body)), ("bladder", _soft(np.maximum(bladder, -gland))),
              ("outer zone", _soft(gland)), ("inner zone", _soft(inner))]
    return layers, np.minimum(label, n_classes - 1)


def _brain(grid: np.ndarray, half: np.ndarray, n_classes: int, style: np.random.Generator,
           rng: np.random.Generator) -> tuple[Layers, np.ndarray]:
    brain = _blob(grid, np.zeros(3, np.float32), half * rng.uniform(0.78, 0.88, 3), rng, wobble=0.06, max_angle=0.2)
    center = _point_inside(brain, grid, 0.55, rng)
    radii = half * rng.uniform(0.32, 0.42) * rng.uniform(0.85, 1.15, 3)
    edema = np.maximum(_blob(grid, center, radii, rng, wobble=0.25), brain)
    core = np.maximum(_blob(grid, center + radii * rng.uniform(-0.15, 0.15, 3), radii * 0.6, rng), edema)
    necrosis = core + 0.4  # inner part of the core; the rest of the core is the enhancing rim
    label = np.zeros(brain.shape, np.uint8)
    label[edema < 0] = 1
    label[core < 0] = 3
    label[necrosis < 0] = 2
    layers = [("brain", _soft(brain)), ("edema", _soft(edema)), ("enhancing", _soft(core)),
              ("necrosis", _soft(necrosis))]
    return layers, np.minimum(label, n_classes - 1)


_ANATOMIES = {"abdomen": _abdomen, "pelvis": _pelvis, "brain": _brain}

# Mean intensity of each tissue per channel; "outside" is what fills the field of view first.
_INTENSITIES: dict[str, dict[str, float]] = {
    "CT": {"outside": -1000, "body": 35, "organ": 110, "lesion1": 45, "lesion2": 190,
           "lesion3": 10, "lesion4": 260},
    "PET": {"outside": 0, "body": 1.0, "organ": 2.0, "lesion1": 9.0, "lesion2": 6.0,
            "lesion3": 12.0, "lesion4": 4.0},
    "T2": {"outside": 5, "body": 220, "bladder": 900, "outer zone": 480, "inner zone": 260},
    "ADC": {"outside": 5, "body": 900, "bladder": 2600, "outer zone": 1600, "inner zone": 1100},
    "FLAIR": {"outside": 0, "brain": 300, "edema": 620, "enhancing": 480, "necrosis": 360},
    "T1W": {"outside": 0, "brain": 420, "edema": 330, "enhancing": 360, "necrosis": 200},
    "T1GD": {"outside": 0, "brain": 420, "edema": 340, "enhancing": 850, "necrosis": 210},
    "T2W": {"outside": 0, "brain": 350, "edema": 700, "enhancing": 520, "necrosis": 820},
}


def _intensities(channel: str, tissues: Iterable[str], style: np.random.Generator) -> dict[str, float]:
    """Tissue means for a channel; unknown MR/PET names get a random contrast fixed per task."""
    table = _INTENSITIES.get(channel.upper()) or _INTENSITIES.get(modality_type(channel))
    if table is not None:
        return table
    return {"outside": 0.0} | {t: float(style.uniform(100, 1000)) for t in tissues}


def _render(layers: Layers, channel: str, style: np.random.Generator, rng: np.random.Generator,
            grid: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Paint the tissue layers in order, then add the modality's noise (and MR bias field)."""
    means = _intensities(channel, [name for name, _ in layers], style)
    kind = modality_type(channel)
    jitter = 15.0 if kind == "CT" else 0.08
    image = np.full(layers[0][1].shape, means["outside"], np.float32)
    for tissue, weight in layers:
        mean = means[tissue] + jitter * rng.normal() * (1 if kind == "CT" else means[tissue])
        image += weight * (mean - image)
    if kind == "CT":
        image += rng.normal(0, rng.uniform(8, 15), image.shape).astype(np.float32)
        return np.clip(np.round(image), -1024, 3071)
    tilt = rng.normal(0, 0.15, 3).astype(np.float32) / half.astype(np.float32)
    image *= np.exp(np.tensordot(tilt, grid, axes=1)) * rng.uniform(0.7, 1.4)
    noise = rng.normal(0, 0.03 * float(image.max()), (2, *image.shape)).astype(np.float32)
    image = np.hypot(image + noise[0], noise[1])  # Rician, like a magnitude image
    if means["outside"] == 0 and kind == "MR":  # skull-stripped: exact zeros outside
        image[layers[0][1] < 0.5] = 0
    return image


# --- cases and files ------------------------------------------------------------------------

def _rng(seed: int, task: SyntheticTask, index: int) -> np.random.Generator:
    """Random draws of one case."""
    return np.random.default_rng([seed, zlib.crc32(task.name.encode()), index])


def _style(seed: int, task: SyntheticTask, key: str) -> np.random.Generator:
    """Random draws fixed for a whole task (organ side, contrast of an unknown channel)."""
    return np.random.default_rng([seed, zlib.crc32(task.name.encode()), zlib.crc32(key.encode()), 1])


def generate_case(task: SyntheticTask, index: int, seed: int = 0) -> SyntheticCase:
    """Case `index` of a task in canonical RAS order; the same arguments give the same case."""
    shape, spacing = tuple(task.shape), tuple(float(s) for s in task.spacing)
    grid = _grid(shape, spacing)
    half = np.asarray(shape, np.float32) * np.asarray(spacing, np.float32) / 2
    rng = _rng(seed, task, index)
    for _ in range(_MAX_TRIES):
        layers, label = _ANATOMIES[anatomy(task)](grid, half, len(task.labels), _style(seed, task, "anatomy"), rng)
        if np.unique(label).size == len(task.labels):
            break
    else:
        raise RuntimeError(f"{task.name} case {index}: could not draw every class in {_MAX_TRIES} tries")
    channels = [_render(layers, m, _style(seed, task, f"channel {c}"), rng, grid, half)
                for c, m in enumerate(task.modalities)]
    dtype = np.int16 if modality_type(task.modalities[0]) == "CT" and len(channels) == 1 else np.float32
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing) + rng.uniform(-20, 20, 3)
    return SyntheticCase(np.stack(channels, axis=-1).astype(dtype), label, affine,
                         ORIENTATIONS[index % len(ORIENTATIONS)])


def oriented_nifti(data: np.ndarray, affine: np.ndarray, orientation: str) -> nib.Nifti1Image:
    """A NIfTI of RAS-ordered data and its RAS affine, stored with the given axis codes (e.g. "LPS").

    Data axes and affine are transformed together, so the image shows the same anatomy at the
    same world position; qform and sform both hold the affine.
    """
    ras = nib.Nifti1Image(data, affine)
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                           nib.orientations.axcodes2ornt(orientation))
    image = ras.as_reoriented(ornt)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def _save_case(task_dir: Path, case_id: str, case: SyntheticCase, layout: Layout, split: str) -> None:
    images = task_dir / f"images{split}"
    if layout == "msd":
        data = case.image[..., 0] if case.image.shape[-1] == 1 else case.image
        nib.save(oriented_nifti(data, case.affine, case.orientation), images / f"{case_id}.nii.gz")
    else:
        for c in range(case.image.shape[-1]):
            channel = oriented_nifti(case.image[..., c], case.affine, case.orientation)
            nib.save(channel, images / f"{case_id}_{c:04d}.nii.gz")
    if split == "Tr":
        nib.save(oriented_nifti(case.label, case.affine, case.orientation), task_dir / "labelsTr" / f"{case_id}.nii.gz")


def _dataset_json(task: SyntheticTask, layout: Layout, train_ids: list[str], test_ids: list[str]) -> dict:
    common = {"name": task.name, "description": "Synthetic data written by pipeline.datasets.synthetic",
              "licence": "CC0", "numTraining": len(train_ids)}
    if layout == "nnunetv2":
        return common | {"channel_names": dict(enumerate(task.modalities)),
                         "labels": {name: i for i, name in enumerate(task.labels)},
                         "file_ending": ".nii.gz"}
    return common | {
        "tensorImageSize": "4D" if len(task.modalities) > 1 else "3D",
        "modality": dict(enumerate(task.modalities)),
        "labels": dict(enumerate(task.labels)),
        "numTest": len(test_ids),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train_ids],
        "test": [f"./imagesTs/{c}.nii.gz" for c in test_ids],
    }


def write_task(root: Path, task: SyntheticTask, layout: Layout = "msd", seed: int = 0) -> Path:
    """Write one task under root/task.name in the given raw layout; returns that folder."""
    if layout not in ("msd", "nnunetv2"):
        raise ValueError(f"layout must be 'msd' or 'nnunetv2', got {layout!r}")
    task_dir = Path(root) / task.name
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task_dir / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{task.case_prefix}_{i:03d}" for i in range(task.num_cases + task.num_test_cases)]
    for i, case_id in enumerate(ids):
        split = "Tr" if i < task.num_cases else "Ts"
        _save_case(task_dir, case_id, generate_case(task, i, seed), layout, split)
    meta = _dataset_json(task, layout, ids[:task.num_cases], ids[task.num_cases:])
    (task_dir / "dataset.json").write_text(json.dumps(meta, indent=2))
    log.info("wrote %s (%d train, %d test, %s layout)", task_dir, task.num_cases, task.num_test_cases, layout)
    return task_dir


def write_collection(root: Path, tasks: Iterable[SyntheticTask] = DEFAULT_TASKS, layout: Layout = "msd",
                     seed: int = 0) -> list[Path]:
    """Write several tasks under root; returns their folders in order."""
    return [write_task(root, task, layout, seed) for task in tasks]
