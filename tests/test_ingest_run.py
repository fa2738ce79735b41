"""End-to-end ingest (in-process Dask scheduler) on tiny synthetic datasets, and the CLI."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from pipeline.common import geometry
from pipeline.common.config import IngestConfig
from pipeline.common.store import StoreError, TaskStore
from pipeline.datasets.synthetic import SyntheticTask, write_task
from pipeline.ingest import writer
from pipeline.ingest.__main__ import main
from pipeline.ingest.run import run

SYNC = IngestConfig(scheduler="synchronous")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def _original_label(raw: Path, case_id: str) -> np.ndarray:
    return np.asarray(nib.load(raw / "labelsTr" / f"{case_id}.nii.gz").dataobj)


def _zarr_json_mtimes(store: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in store.rglob("zarr.json")}


def test_msd_round_trip_is_exact_without_resampling(raw_msd: Path, tmp_path: Path) -> None:
    report = run([raw_msd], str(tmp_path), SYNC)
    assert report.ok and len(report.datasets[0].ingested) == 5
    store = TaskStore.open(str(tmp_path / f"{raw_msd.name}.zarr"))
    m = store.manifest
    assert (m.task_name, m.modalities, m.num_classes, m.in_channels) == (raw_msd.name, ("CT",), 3, 1)
    assert m.target_spacing == (4.0, 1.5, 1.5)  # (z, y, x): the synthetic spacing, no resampling
    assert m.normalization[0].scheme == "ct-clip-zscore"
    assert sorted(store.case_ids("train") + store.case_ids("validation")) == [f"tinyliver_00{i}" for i in range(4)]
    assert len(m.split["validation"]) == 1 and store.case_ids("test") == ["tinyliver_004"]
    for case_id in store.case_ids("train") + store.case_ids("validation"):  # RAS, LPS and ASL files
        image, label = store.read_case(case_id)
        assert image.dtype == np.float32 and image.shape[1:] == label.shape and label.dtype == np.uint8
        restored = geometry.restore_label(label, store.case_meta(case_id))
        np.testing.assert_array_equal(np.asarray(restored.dataobj), _original_label(raw_msd, case_id))
        np.testing.assert_allclose(restored.affine, nib.load(raw_msd / "labelsTr" / f"{case_id}.nii.gz").affine)
    image, label = store.read_case("tinyliver_004")
    assert label is None and image.shape[0] == 1


def test_nnunet_layout_round_trip_with_resampling(raw_nnunet: Path, tmp_path: Path) -> None:
    cfg = IngestConfig(scheduler="synchronous", target_spacing=(2.0, 0.8, 0.8), image_order=1)
    assert run([raw_nnunet], str(tmp_path), cfg).ok
    store = TaskStore.open(str(tmp_path / f"{raw_nnunet.name}.zarr"))
    assert store.manifest.modalities == ("T2", "ADC")
    assert [n.scheme for n in store.manifest.normalization] == ["zscore", "zscore"]
    for case_id in store.case_ids("all"):
        meta = store.case_meta(case_id)
        assert meta.spacing == (2.0, 0.8, 0.8) and meta.shape != meta.canonical_shape
        image, label = store.read_case(case_id)
        assert image.shape == (2, *meta.shape)
        if label is None:
            continue
        restored = np.asarray(geometry.restore_label(label, meta).dataobj)
        original = _original_label(raw_nnunet, case_id)
        for c in (1, 2):
            assert _dice(restored == c, original == c) >= 0.99, (case_id, c)


def test_msd_4d_images_equal_nnunet_channel_files(raw_nnunet: Path, tiny_mr_task: SyntheticTask,
                                                  tmp_path: Path) -> None:
    """The same synthetic cases as one 4D NIfTI per case (original MSD) give the same store."""
    raw_4d = write_task(tmp_path / "msd", tiny_mr_task, layout="msd")
    assert nib.load(raw_4d / "imagesTr" / "tinyprostate_000.nii.gz").ndim == 4
    assert run([raw_4d], str(tmp_path / "a"), SYNC).ok and run([raw_nnunet], str(tmp_path / "b"), SYNC).ok
    a = TaskStore.open(str(tmp_path / "a" / f"{raw_4d.name}.zarr"))
    b = TaskStore.open(str(tmp_path / "b" / f"{raw_nnunet.name}.zarr"))
    assert a.case_ids() == b.case_ids()
    for case_id in a.case_ids():
        image_a, label_a = a.read_case(case_id)
        image_b, label_b = b.read_case(case_id)
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(label_a, label_b)


def test_rerun_is_a_noop_and_overwrite_rewrites(raw_msd: Path, tmp_path: Path) -> None:
    assert run([raw_msd], str(tmp_path), SYNC).ok
    store = tmp_path / f"{raw_msd.name}.zarr"
    before = _zarr_json_mtimes(store)
    again = run([raw_msd], str(tmp_path), SYNC).datasets[0]
    assert (again.ingested, len(again.skipped)) == ([], 5)
    assert _zarr_json_mtimes(store) == before
    forced = run([raw_msd], str(tmp_path), IngestConfig(scheduler="synchronous", overwrite=True)).datasets[0]
    assert len(forced.ingested) == 5 and not forced.skipped


def test_changed_source_case_and_split_options(raw_msd: Path, tmp_path: Path) -> None:
    raw = shutil.copytree(raw_msd, tmp_path / raw_msd.name)
    assert run([raw], str(tmp_path / "out"), SYNC).ok
    # A rewritten file with the same bytes is no change; a changed test case is redone alone:
    # test cases do not enter the plan.
    shutil.copy(raw / "imagesTs" / "tinyliver_004.nii.gz", tmp_path / "copy.nii.gz")
    shutil.move(tmp_path / "copy.nii.gz", raw / "imagesTs" / "tinyliver_004.nii.gz")
    assert len(run([raw], str(tmp_path / "out"), SYNC).datasets[0].skipped) == 5
    shutil.copy(raw / "imagesTr" / "tinyliver_000.nii.gz", raw / "imagesTs" / "tinyliver_004.nii.gz")
    report = run([raw], str(tmp_path / "out"), SYNC).datasets[0]
    assert report.ingested == ["tinyliver_004"] and len(report.skipped) == 4
    # New folds only rewrite the manifest.
    half = IngestConfig(scheduler="synchronous", folds=2)
    report = run([raw], str(tmp_path / "out"), half).datasets[0]
    assert report.ingested == []
    assert len(TaskStore.open(str(tmp_path / "out" / f"{raw.name}.zarr")).manifest.split["validation"]) == 2
    # A case whose file went missing keeps its stored copy, marked stale.
    (raw / "imagesTs" / "tinyliver_004.nii.gz").unlink()
    report = run([raw], str(tmp_path / "out"), SYNC).datasets[0]
    assert "missing image" in report.failed["tinyliver_004"][0] and report.stale == ["tinyliver_004"]
    store = TaskStore.open(str(tmp_path / "out" / f"{raw.name}.zarr"))
    assert store.case_ids("test") == ["tinyliver_004"] and "missing image" in store.manifest.stale["tinyliver_004"]
    # A case no longer listed by the source leaves the store and the manifest.
    meta = json.loads((raw / "dataset.json").read_text())
    meta["test"] = []
    (raw / "dataset.json").write_text(json.dumps(meta))
    assert run([raw], str(tmp_path / "out"), SYNC).ok
    store = TaskStore.open(str(tmp_path / "out" / f"{raw.name}.zarr"))
    assert store.case_ids("test") == [] and "tinyliver_004" not in zarr.open_group(store.uri, mode="r")["cases"]
    assert store.manifest.incomplete() is None


def test_resume_after_a_run_killed_mid_case(raw_msd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = writer.write_case
    calls = []

    def dies_on_third_case(uri, storage_options, case_id, arrays, attrs, chunk_size, **kwargs):  # noqa: ANN001
        calls.append(case_id)
        if len(calls) == 3:  # the image lands, then the process "dies" before the commit marker
            group = zarr.open_group(uri, mode="a")["cases"].create_group(case_id, overwrite=True)
            group.create_array("image", data=arrays[0])
            raise KeyboardInterrupt
        real_write(uri, storage_options, case_id, arrays, attrs, chunk_size, **kwargs)

    monkeypatch.setattr(writer, "write_case", dies_on_third_case)
    with pytest.raises(KeyboardInterrupt):
        run([raw_msd], str(tmp_path), SYNC)
    uri = str(tmp_path / f"{raw_msd.name}.zarr")
    with pytest.raises(StoreError, match="no manifest"):
        TaskStore.open(uri)
    root = zarr.open_group(uri, mode="r")
    assert writer.completed_case_attrs(root, calls[2]) is None
    assert all(writer.completed_case_attrs(root, c) is not None for c in calls[:2])
    monkeypatch.setattr(writer, "write_case", real_write)
    report = run([raw_msd], str(tmp_path), SYNC).datasets[0]
    assert sorted(report.skipped) == sorted(calls[:2]) and len(report.ingested) == 3
    store = TaskStore.open(uri)
    assert store.read_case(calls[2])[1] is not None


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path: Path) -> None:
    """A real kill -9 of a single-process ingest right after its first case is committed."""
    raw = write_task(tmp_path, SyntheticTask("Task06_Kill", ("CT",), ("background", "organ"), (1.0, 1.0, 2.0),
                                             (48, 48, 32), num_cases=6))
    uri = tmp_path / "out" / "Task06_Kill.zarr"
    cmd = [sys.executable, "-m", "pipeline.ingest", "--source", str(raw), "--out", str(tmp_path / "out"),
           "--scheduler", "synchronous", "--target-spacing", "1.5", "0.7", "0.7"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(b'"complete": true' in p.read_bytes() for p in uri.glob("cases/*/zarr.json")):
        assert process.poll() is None and time.monotonic() < deadline, "ingest ended before any case completed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with pytest.raises(StoreError, match="no manifest"):
        TaskStore.open(str(uri))
    root = zarr.open_group(str(uri), mode="r")
    complete = [c for c in root["cases"].group_keys() if writer.completed_case_attrs(root, c) is not None]
    assert 1 <= len(complete) < 6
    for case_id in complete:  # whatever looks complete is complete
        group = root[f"cases/{case_id}"]
        assert group["image"][...].shape[1:] == group["label"][...].shape
    report = run([raw], str(tmp_path / "out"), IngestConfig(scheduler="synchronous", target_spacing=(1.5, 0.7, 0.7)))
    dataset = report.datasets[0]
    assert report.ok and sorted(dataset.skipped) == sorted(complete) and len(dataset.ingested) == 6 - len(complete)


def test_cli_local_cluster_and_exit_status(raw_msd: Path, tmp_path: Path) -> None:
    bad = shutil.copytree(raw_msd, tmp_path / "Task09_Bad")
    (bad / "labelsTr" / "tinyliver_001.nii.gz").unlink()
    cmd = [sys.executable, "-m", "pipeline.ingest", "--source", str(raw_msd), "--source", str(bad),
           "--out", str(tmp_path / "out"), "--num-workers", "2", "--ct-normalization", "uniseg-window"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr  # a missing file is bad input
    assert "tinyliver_001.nii.gz: missing label for case tinyliver_001" in result.stderr
    assert "4 ingested, 0 unchanged, 1 failed" in result.stderr
    good = TaskStore.open(str(tmp_path / "out" / f"{raw_msd.name}.zarr"))
    assert good.manifest.normalization[0].scheme == "ct-window"
    assert "tinyliver_001" not in TaskStore.open(str(tmp_path / "out" / "Task09_Bad.zarr")).manifest.cases
    rerun = subprocess.run(cmd[:-4] + ["--scheduler", "synchronous", "--ct-normalization", "uniseg-window"],
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 2 and "0 ingested, 4 unchanged, 1 failed" in rerun.stderr


def test_cli_rejects_bad_options(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    status = main(["--source", "x", "--out", str(tmp_path), "--folds", "1"])
    assert status == 2 and "ingest.folds: must be >= 2" in caplog.text


def test_cli_flags_override_the_config_file(raw_msd: Path, tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text("data:\n  stores: [absent.zarr]\ningest:\n  ct_normalization: uniseg-window\n  image_order: 1\n")
    status = main(["--source", str(raw_msd), "--out", str(tmp_path), "--config", str(config),
                   "--scheduler", "synchronous", "--image-order", "3"])
    manifest = TaskStore.open(str(tmp_path / f"{raw_msd.name}.zarr")).manifest
    assert status == 0 and manifest.normalization[0].scheme == "ct-window" and manifest.image_order == 3
