"""Bad input: every problem is one line naming the file, the other cases go on, failed cases stay
out of the manifest, an all-background label is only a warning."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.common.config import IngestConfig
from pipeline.common.store import TaskStore
from pipeline.ingest.run import run

GOOD = "tinyliver_000"
# case id -> (file that is named, words of the problem)
EXPECTED = {
    "missing_label": ("labelsTr/missing_label.nii.gz", "missing label"),
    "shape_mismatch": ("labelsTr/shape_mismatch.nii.gz", "shape (32, 32, 15) != image (32, 32, 16)"),
    "affine_mismatch": ("labelsTr/affine_mismatch.nii.gz", "affine differs from the image's"),
    "undeclared_label": ("labelsTr/undeclared_label.nii.gz", "label values [7] not declared in dataset.json"),
    "nan_voxels": ("imagesTr/nan_voxels.nii.gz", "3 NaN/inf voxels"),
    "corrupt_file": ("imagesTr/corrupt_file.nii.gz", "cannot read NIfTI"),
    "not_nifti": ("imagesTr/not_nifti.nii.gz", "cannot read NIfTI"),
    "two_channels": ("imagesTr/two_channels.nii.gz", "2 channels, dataset.json declares 1"),
    "flat_2d": ("imagesTr/flat_2d.nii.gz", "2D image of shape (32, 32, 1)"),
}


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def _bad_dataset(raw: Path, tmp_path: Path) -> Path:
    root = shutil.copytree(raw, tmp_path / "Task07_Bad")
    good = nib.load(root / "imagesTr" / f"{GOOD}.nii.gz")
    image, affine = np.asarray(good.dataobj).astype(np.float32), good.affine
    label = np.asarray(nib.load(root / "labelsTr" / f"{GOOD}.nii.gz").dataobj)
    images, labels = root / "imagesTr", root / "labelsTr"
    for case_id in [*EXPECTED, "empty_label"]:
        _save(image, affine, images / f"{case_id}.nii.gz")
        _save(label, affine, labels / f"{case_id}.nii.gz")
    (labels / "missing_label.nii.gz").unlink()
    _save(label[:, :, :-1], affine, labels / "shape_mismatch.nii.gz")
    _save(label, affine + np.diag([0, 0, 0.1, 0]), labels / "affine_mismatch.nii.gz")
    _save(np.where(label == 2, 7, label).astype(np.uint8), affine, labels / "undeclared_label.nii.gz")
    nan_image = image.copy()
    nan_image[0, 0, :3] = [np.nan, np.inf, -np.inf]
    _save(nan_image, affine, images / "nan_voxels.nii.gz")
    data = (images / "corrupt_file.nii.gz").read_bytes()
    (images / "corrupt_file.nii.gz").write_bytes(gzip.compress(gzip.decompress(data)[:1000]))
    (images / "not_nifti.nii.gz").write_text("this is not an image\n")
    _save(np.stack([image, image], axis=-1), affine, images / "two_channels.nii.gz")
    _save(image[:, :, :1], affine, images / "flat_2d.nii.gz")
    _save(np.zeros_like(label), affine, labels / "empty_label.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] += [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                         for c in [*EXPECTED, "empty_label"]]
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def bad_run(raw_msd: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp_path = tmp_path_factory.mktemp("bad")
    bad = _bad_dataset(raw_msd, tmp_path)
    unreadable = tmp_path / "Task08_Unreadable"
    unreadable.mkdir()
    (unreadable / "dataset.json").write_text("{not json")
    report = run([bad, unreadable], str(tmp_path / "out"), IngestConfig(scheduler="synchronous"))
    return report, tmp_path


def test_each_bad_case_fails_with_one_line_naming_the_file(bad_run: tuple) -> None:
    report, _ = bad_run
    dataset = report.datasets[0]
    assert not report.ok and sorted(dataset.failed) == sorted(EXPECTED)
    for case_id, (path, words) in EXPECTED.items():
        problems = dataset.failed[case_id]
        assert len(problems) == 1 and "\n" not in problems[0], problems
        assert path in problems[0] and words in problems[0], problems


def test_good_cases_go_on_and_failed_ones_stay_out_of_the_manifest(bad_run: tuple) -> None:
    report, tmp_path = bad_run
    dataset = report.datasets[0]
    assert sorted(dataset.ingested) == ["empty_label"] + [f"tinyliver_00{i}" for i in range(5)]
    assert dataset.warnings == [f"{tmp_path}/Task07_Bad/labelsTr/empty_label.nii.gz: label is all background"]
    manifest = TaskStore.open(dataset.store).manifest
    assert set(manifest.cases) == {*dataset.ingested} and not set(EXPECTED) & set(manifest.cases)


def test_unreadable_dataset_json_fails_that_dataset_only(bad_run: tuple) -> None:
    report, _ = bad_run
    unreadable = report.datasets[1]
    assert "Task08_Unreadable/dataset.json: unreadable dataset.json" in (unreadable.error or "")
    assert "FAILED" in unreadable.summary()


def test_rerun_reports_the_same_failures_without_the_plan_pass(bad_run: tuple) -> None:
    report, tmp_path = bad_run
    again = run([tmp_path / "Task07_Bad"], str(tmp_path / "out"), IngestConfig(scheduler="synchronous")).datasets[0]
    assert again.failed == report.datasets[0].failed
    assert again.ingested == [] and len(again.skipped) == 6
