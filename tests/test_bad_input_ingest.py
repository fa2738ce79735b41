"""The ingest share of the bad-input catalogue (docs/architecture.md, "Bad-input catalogue: ingest").

Each entry breaks a copy of the tiny MSD task (`Task09_Bad`) in one way and runs the real CLI
(`pipeline.ingest.__main__.main`, in-process Dask scheduler) next to an intact source; it checks
the exit status, that the problem is one log line naming the file (and key or case), and that
nothing good was lost: the intact source is ingested, the bad dataset's other cases are stored,
and a re-run never deletes a stored good case, nor hides that it failed. Disk-full and read-only output run the CLI in a
user + mount namespace on a real tmpfs (skipped where `unshare` is not allowed).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from pipeline.common.config import config_from_dict
from pipeline.common.store import StoreError, TaskStore
from pipeline.ingest.__main__ import main

BAD = "Task09_Bad"
CASE = "tinyliver_001"
TEST_CASE = "tinyliver_004"
ROOT = Path(__file__).resolve().parents[1]


def _edit_json(raw: Path, change: Callable[[dict], object]) -> None:
    meta = json.loads((raw / "dataset.json").read_text())
    change(meta)
    (raw / "dataset.json").write_text(json.dumps(meta))


def _rewrite(path: Path, change: Callable[[np.ndarray], np.ndarray], affine: np.ndarray | None = None) -> None:
    nifti = nib.load(path)
    data = change(np.asarray(nifti.dataobj))
    nib.save(nib.Nifti1Image(data, nifti.affine if affine is None else affine), path)


def _image(raw: Path) -> Path:
    return raw / "imagesTr" / f"{CASE}.nii.gz"


def _test_image(raw: Path) -> Path:
    return raw / "imagesTs" / f"{TEST_CASE}.nii.gz"


def _label(raw: Path) -> Path:
    return raw / "labelsTr" / f"{CASE}.nii.gz"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _shifted_affine(path: Path) -> np.ndarray:
    affine = nib.load(path).affine.copy()
    affine[0, 3] += 5.0
    return affine


def _set_affine(path: Path, affine: np.ndarray) -> None:
    """Save the image with `affine` as its sform and no qform (nibabel cannot derive a qform from
    a singular affine)."""
    nifti = nib.load(path)
    header = nifti.header.copy()
    header.set_sform(affine, code=1)
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.asarray(nifti.dataobj), None, header), path)


def _nan_affine(path: Path) -> np.ndarray:
    affine = nib.load(path).affine.copy()
    affine[2, 3] = np.nan
    return affine


def _test_entries_with_labels(meta: dict) -> None:
    """MONAI datalist test entries that name label files (not written)."""
    meta["test"] = [{"image": path, "label": path.replace("imagesTs", "labelsTs")} for path in meta["test"]]


@dataclass(frozen=True)
class Bad:
    """One bad input: how to break the copy, the exit status, a regex of the one-line message,
    and which good data must survive: "dataset" (the intact source is ingested; nothing of the
    bad one is), "case" (the bad dataset's other cases are stored, the case is recorded as
    failed), "rerun" (the bad case's stored copy from a first, good run is kept, marked stale),
    "dataset rerun" (the whole dataset fails at a re-run: the store of the first, good run keeps
    every case, its manifest records the failure)."""

    name: str
    breaks: Callable[[Path], object]
    message: str
    scope: str
    status: int = 2
    case: str = CASE  # the case that fails (scopes "case" and "rerun")
    row: str = ""  # its row of the catalogue in docs/architecture.md (tests/test_catalogue.py)


CATALOGUE = [
    # dataset.json and the dataset as a whole
    Bad("no dataset.json", lambda r: (r / "dataset.json").unlink(), r"Task09_Bad/dataset.json: dataset.json not found",
        "dataset", row="json-unreadable"),
    Bad("dataset.json not JSON", lambda r: (r / "dataset.json").write_text("{'name': "),
        r"Task09_Bad/dataset.json: unreadable dataset.json", "dataset", row="json-unreadable"),
    Bad("dataset.json a list", lambda r: (r / "dataset.json").write_text("[]"),
        r"Task09_Bad/dataset.json: dataset.json must hold an object", "dataset", row="json-unreadable"),
    Bad("image null", lambda r: _edit_json(r, lambda m: m["training"][1].update(image=None)),
        r"Task09_Bad/dataset.json: training.1.image: Input should be a valid string \(got None\)", "dataset",
        row="json-key-type"),
    Bad("label a number", lambda r: _edit_json(r, lambda m: m["training"][0].update(label=3)),
        r"Task09_Bad/dataset.json: training.0.label: Input should be a valid string \(got 3\)", "dataset",
        row="json-key-type"),
    Bad("training not a list", lambda r: _edit_json(r, lambda m: m.update(training={"a": 1})),
        r"Task09_Bad/dataset.json: training: Input should be a valid list", "dataset", row="json-key-type"),
    Bad("labels missing", lambda r: _edit_json(r, lambda m: m.pop("labels")),
        r"Task09_Bad/dataset.json: labels: Field required", "dataset", row="json-key-type"),
    Bad("modality indices", lambda r: _edit_json(r, lambda m: m.update(modality={"1": "CT"})),
        r"Task09_Bad/dataset.json: 'modality' indices must be 0..0", "dataset", row="json-values"),
    Bad("label ids with a gap", lambda r: _edit_json(r, lambda m: m.update(labels={"0": "bg", "2": "x"})),
        r"Task09_Bad/dataset.json: label ids must be 0..N-1", "dataset", row="json-values"),
    Bad("region-based labels",
        lambda r: _edit_json(r, lambda m: m.update(labels={"background": 0, "liver": [1, 2], "tumour": 2})),
        r"Task09_Bad/dataset.json: labels.liver: region-based label \[1, 2\] is not supported", "dataset",
        row="json-labels-form"),
    Bad("labels in neither form", lambda r: _edit_json(r, lambda m: m.update(labels={"background": "0", "a": "1"})),
        r"Task09_Bad/dataset.json: labels: must map id -> name \(.*\) or name -> id", "dataset",
        row="json-labels-form"),
    Bad("test entry neither path nor object", lambda r: _edit_json(r, lambda m: m.update(test=[3])),
        r"Task09_Bad/dataset.json: test.0: Input should be a file path or an object with an 'image' key", "dataset",
        row="json-key-type"),
    Bad("file_ending not NIfTI", lambda r: _edit_json(r, lambda m: m.update(file_ending=".mha")),
        r"Task09_Bad/dataset.json: file_ending '.mha' is not supported", "dataset", row="json-values"),
    Bad("no training cases", lambda r: _edit_json(r, lambda m: m.update(training=[])),
        r"Task09_Bad: no training cases found", "dataset", row="json-values"),
    Bad("duplicate case id", lambda r: _edit_json(r, lambda m: m["training"].append(
        {"image": f"./imagesTs/{CASE}.nii.gz", "label": f"./labelsTr/{CASE}.nii.gz"})),
        rf"Task09_Bad/dataset.json: case id '{CASE}' given twice: \S+/imagesTr/{CASE}.nii.gz and "
        rf"\S+/imagesTs/{CASE}.nii.gz", "dataset", row="case-id-twice"),
    # one case: reported, skipped, the others stored
    Bad("missing label", lambda r: _label(r).unlink(), rf"labelsTr/{CASE}.nii.gz: missing label for case {CASE}",
        "case", row="file-missing"),
    Bad("missing image", lambda r: _image(r).unlink(), rf"imagesTr/{CASE}.nii.gz: missing image", "case",
        row="file-missing"),
    Bad("missing listed test label", lambda r: _edit_json(r, _test_entries_with_labels),
        rf"labelsTs/{TEST_CASE}.nii.gz: missing label for case {TEST_CASE}", "case", case=TEST_CASE,
        row="file-missing"),
    Bad("truncated image", lambda r: _truncate(_image(r)), rf"imagesTr/{CASE}.nii.gz: cannot read NIfTI", "case",
        row="file-unreadable"),
    Bad("image not NIfTI", lambda r: _image(r).write_bytes(gzip.compress(b"not a nifti file" * 40)),
        rf"imagesTr/{CASE}.nii.gz: cannot read NIfTI", "case", row="file-unreadable"),
    Bad("label shape", lambda r: _rewrite(_label(r), lambda a: a[:-1]), rf"labelsTr/{CASE}.nii.gz: shape .* != image",
        "case", row="label-mismatch"),
    Bad("label affine", lambda r: _rewrite(_label(r), lambda a: a, _shifted_affine(_label(r))),
        rf"labelsTr/{CASE}.nii.gz: affine differs from the image's", "case", row="label-mismatch"),
    Bad("NaN in image", lambda r: _rewrite(_image(r), lambda a: np.where(a > 100, np.nan, a).astype(np.float32)),
        rf"imagesTr/{CASE}.nii.gz: \d+ NaN/inf voxels", "case", row="file-unreadable"),
    Bad("undeclared label value", lambda r: _rewrite(_label(r), lambda a: np.where(a == 1, 7, a).astype(np.uint8)),
        rf"labelsTr/{CASE}.nii.gz: label values \[7\] not declared in dataset.json", "case", row="label-mismatch"),
    Bad("fractional label", lambda r: _rewrite(_label(r), lambda a: (a * 0.5).astype(np.float32)),
        rf"labelsTr/{CASE}.nii.gz: label values are not integers", "case", row="label-mismatch"),
    Bad("2D image", lambda r: _rewrite(_image(r), lambda a: a[:, :, :1]), rf"imagesTr/{CASE}.nii.gz: 2D image", "case",
        row="file-unreadable"),
    Bad("singular image affine", lambda r: _set_affine(_image(r), np.diag([1.5, 1.5, 0.0, 1.0])),
        rf"imagesTr/{CASE}.nii.gz: singular affine \(voxel sizes 1.5, 1.5, 0 mm", "case", row="file-unreadable"),
    Bad("NaN in image affine", lambda r: _set_affine(_image(r), _nan_affine(_image(r))),
        rf"imagesTr/{CASE}.nii.gz: affine holds NaN or infinite values", "case", row="file-unreadable"),
    Bad("too many channels", lambda r: _rewrite(_image(r), lambda a: np.stack([a, a], axis=-1)),
        rf"imagesTr/{CASE}.nii.gz: 2 channels, dataset.json declares 1", "case", row="file-unreadable"),
    # a re-run after a good ingest: the stored case is kept, marked stale
    Bad("label missing at re-run", lambda r: _label(r).unlink(), rf"labelsTr/{CASE}.nii.gz: missing label", "rerun",
        row="stale-at-rerun"),
    Bad("test image corrupt at re-run", lambda r: _truncate(_test_image(r)),
        rf"imagesTs/{TEST_CASE}.nii.gz: cannot read NIfTI", "rerun", case=TEST_CASE, row="stale-at-rerun"),
    # a re-run failing for the whole dataset: the store of the good run is kept, marked failed
    Bad("dataset.json invalid at re-run", lambda r: _edit_json(r, lambda m: m["training"][1].update(image=None)),
        r"Task09_Bad/dataset.json: training.1.image: Input should be a valid string", "dataset rerun",
        row="dataset-at-rerun"),
    Bad("source folder gone at re-run", shutil.rmtree, r"Task09_Bad/dataset.json: dataset.json not found",
        "dataset rerun", row="dataset-at-rerun"),
    Bad("training image corrupt at re-run", lambda r: _truncate(_image(r)),
        rf"Task09_Bad.zarr: the plan would change \(.*channel 0 mean \S+ -> \S+.*\), but {CASE} would keep its "
        "stored copy preprocessed the earlier way", "dataset rerun", row="plan-change-refused"),
]


def _cli(*args: str) -> list[str]:
    return [*args, "--scheduler", "synchronous"]


def _one_line(caplog: pytest.LogCaptureFixture, pattern: str) -> str:
    """The single log record whose message matches `pattern`; each problem is one line."""
    lines = [line for r in caplog.records if r.levelno >= logging.ERROR for line in r.getMessage().splitlines()]
    found = [line for line in lines if re.search(pattern, line)]
    assert found, f"no error line matches {pattern!r}:\n" + "\n".join(lines)
    return found[0]


@pytest.mark.parametrize("bad", CATALOGUE, ids=[b.name for b in CATALOGUE])
def test_bad_input(bad: Bad, raw_msd: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = shutil.copytree(raw_msd, tmp_path / BAD)
    out = tmp_path / "out"
    sources = ["--source", str(raw)] + (["--source", str(raw_msd)] if bad.scope == "dataset" else [])
    if bad.scope in ("rerun", "dataset rerun"):
        assert main(_cli(*sources, "--out", str(out))) == 0
        before = TaskStore.open(str(out / f"{BAD}.zarr")).read_case(bad.case)
    bad.breaks(raw)
    caplog.clear()
    assert main(_cli(*sources, "--out", str(out))) == bad.status
    line = _one_line(caplog, bad.message)
    if bad.scope == "dataset":
        assert len(TaskStore.open(str(out / f"{raw_msd.name}.zarr")).case_ids()) == 5
        assert not (out / f"{BAD}.zarr").exists()
        return
    if bad.scope == "dataset rerun":
        _check_marked_failed(str(out / f"{BAD}.zarr"), line, before, caplog)
        return
    store = TaskStore.open(str(out / f"{BAD}.zarr"))
    others = {f"tinyliver_00{i}" for i in range(5)} - {bad.case}
    assert others <= set(store.case_ids())
    if bad.scope == "case":
        assert bad.case not in store.case_ids() and list(store.manifest.failed) == [bad.case]
        assert store.manifest.failed[bad.case] and store.manifest.stale == {}
    else:
        assert bad.case in store.case_ids()
        assert list(store.manifest.stale) == [bad.case]
        for got, want in zip(store.read_case(bad.case), before):
            np.testing.assert_array_equal(got, want)
        with pytest.raises(StoreError, match="did not finish cleanly: 1 stale case.*allow_incomplete_stores"):
            TaskStore.open(store.uri, allow_incomplete=False)


def _check_marked_failed(uri: str, line: str, before: tuple, caplog: pytest.LogCaptureFixture) -> None:
    """The store of the earlier, good ingest: every case as it was, the failure in its manifest,
    a warning on open, refused unless incomplete stores are allowed."""
    caplog.clear()
    store = TaskStore.open(uri)
    assert f"{uri}: its last ingest did not finish cleanly: it failed at " in caplog.text
    assert len(store.case_ids()) == 5 and store.manifest.failed == {} and store.manifest.stale == {}
    for got, want in zip(store.read_case(CASE), before):
        np.testing.assert_array_equal(got, want)
    marked = store.manifest.last_ingest_failed
    assert marked["reason"] == line and datetime.fromisoformat(marked["at"]).tzinfo is not None
    with pytest.raises(StoreError, match="did not finish cleanly: it failed at .*allow_incomplete_stores"):
        TaskStore.open(uri, allow_incomplete=False)


def _store(raw_msd: Path, out: Path) -> str:
    assert main(_cli("--source", str(raw_msd), "--out", str(out))) == 0
    return str(out / f"{raw_msd.name}.zarr")


@pytest.mark.catalogue("bad-option")
@pytest.mark.catalogue("sources-one-name")
def test_bad_options(raw_msd: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(_cli("--source", str(raw_msd), "--out", str(out), "--folds", "1")) == 2
    _one_line(caplog, r"ingest.folds: must be >= 2")
    assert main(_cli("--source", str(raw_msd), "--out", str(out), "--config", str(tmp_path / "absent.yaml"))) == 2
    _one_line(caplog, r"absent.yaml: cannot read config")
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", str(raw_msd)])
    assert exit_info.value.code == 2 and not out.exists()
    twin = shutil.copytree(raw_msd, tmp_path / "elsewhere" / raw_msd.name)
    assert main(_cli("--source", str(raw_msd), "--source", str(twin), "--out", str(out))) == 2
    _one_line(caplog, rf"{raw_msd} and {twin} would both write {out}/{raw_msd.name}.zarr")
    assert not out.exists()


@pytest.mark.catalogue("out-unwritable")
def test_output_that_is_a_file_is_refused_before_any_work(raw_msd: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert main(_cli("--source", str(raw_msd), "--out", str(out))) == 2
    _one_line(caplog, rf"{out}: exists and is a file, not a folder")
    assert "starting" not in caplog.text and "target spacing" not in caplog.text


@pytest.mark.catalogue("store-version")
def test_store_of_an_older_format_version(raw_msd: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = _store(raw_msd, tmp_path / "out")
    zarr.open_group(uri, mode="a").attrs["format_version"] = 2
    assert main(_cli("--source", str(raw_msd), "--out", str(tmp_path / "out"))) == 2
    _one_line(caplog, r"store format version 2 .root attribute format_version. is not supported .*--overwrite")
    assert main(_cli("--source", str(raw_msd), "--out", str(tmp_path / "out"), "--overwrite")) == 0
    assert len(TaskStore.open(uri).case_ids()) == 5


@pytest.mark.catalogue("verify-corrupt")
def test_verify(raw_msd: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = _store(raw_msd, tmp_path / "out")
    assert main(["--verify", uri]) == 0
    shard = next(Path(uri, "cases", "tinyliver_002", "image").rglob("c/*/*/*/*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    caplog.clear()
    assert main(["--verify", uri, "--verify", str(tmp_path / "absent.zarr")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"{uri}: case 'tinyliver_002', array 'image': chunk ") and "CRC32C" in errors[0]
    assert "absent.zarr: not a Zarr group" in errors[1]


def test_training_refuses_an_incomplete_store_unless_told(raw_msd: Path, tmp_path: Path) -> None:
    from pipeline.common.config import ConfigError
    from pipeline.train.run import check_stores

    raw = shutil.copytree(raw_msd, tmp_path / BAD)
    _label(raw).unlink()
    assert main(_cli("--source", str(raw), "--out", str(tmp_path / "out"))) == 2
    data = {"data": {"stores": [str(tmp_path / "out" / f"{BAD}.zarr")]}}
    with pytest.raises(ConfigError, match="did not finish cleanly: 1 failed case.*data.allow_incomplete_stores"):
        check_stores(config_from_dict(data, "<test>"))
    data["data"]["allow_incomplete_stores"] = True
    check_stores(config_from_dict(data, "<test>"))


def test_failed_ingest_mark_stops_training_until_a_good_ingest_clears_it(raw_msd: Path, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.common.config import ConfigError
    from pipeline.train.run import check_stores

    raw, out = shutil.copytree(raw_msd, tmp_path / BAD), tmp_path / "out"
    assert main(_cli("--source", str(raw), "--out", str(out))) == 0
    good = (raw / "dataset.json").read_text()
    (raw / "dataset.json").write_text("[]")
    assert main(_cli("--source", str(raw), "--out", str(out))) == 2
    data = {"data": {"stores": [str(out / f"{BAD}.zarr")]}}
    with pytest.raises(ConfigError, match="did not finish cleanly: it failed at .*dataset.json must hold an object"):
        check_stores(config_from_dict(data, "<test>"))
    check_stores(config_from_dict({"data": data["data"] | {"allow_incomplete_stores": True}}, "<test>"))
    (raw / "dataset.json").write_text(good)
    caplog.set_level(logging.INFO)
    assert main(_cli("--source", str(raw), "--out", str(out))) == 0
    assert "0 ingested, 5 unchanged, 0 failed" in caplog.text
    assert TaskStore.open(str(out / f"{BAD}.zarr"), allow_incomplete=False).manifest.last_ingest_failed == {}


@pytest.mark.catalogue("mtime-restored")
def test_content_change_with_mtime_restored_is_seen(raw_msd: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A label edited in place, size and mtime kept: re-ingested by default; the stat fast path
    (opt-in) trusts the unchanged size and mtime."""
    raw = shutil.copytree(raw_msd, tmp_path / BAD)
    out = tmp_path / "out"
    assert main(_cli("--source", str(raw), "--out", str(out))) == 0
    label = _label(raw)
    stat = label.stat()
    data = bytearray(label.read_bytes())
    data[-10] ^= 0xFF  # inside the gzip stream's checksum trailer: same size, other bytes
    label.write_bytes(bytes(data))
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    attrs = zarr.open_group(str(out / f"{BAD}.zarr"), mode="r")[f"cases/{CASE}"].attrs
    before = attrs["source_fingerprint"]
    assert main(_cli("--source", str(raw), "--out", str(out), "--change-detection", "stat")) == 0
    assert zarr.open_group(str(out / f"{BAD}.zarr"), mode="r")[f"cases/{CASE}"].attrs["source_fingerprint"] == before
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert main(_cli("--source", str(raw), "--out", str(out))) == 0
    assert "1 ingested, 4 unchanged" in caplog.text
    assert zarr.open_group(str(out / f"{BAD}.zarr"), mode="r")[f"cases/{CASE}"].attrs["source_fingerprint"] != before


def _recipes(uri: str) -> set[str]:
    """The preprocessing recipes (plan and write options) of the cases a store's manifest lists."""
    store, root = TaskStore.open(uri), zarr.open_group(uri, mode="r")
    return {root[f"cases/{c}"].attrs["recipe"] for c in store.case_ids()}


def _brighten(raw: Path) -> None:
    """A valid edit of a training image that moves the dataset's CT statistics."""
    _rewrite(_image(raw), lambda a: (a * 1.5 + 40).astype(np.float32))


@pytest.mark.catalogue("plan-change-refused")
def test_rerun_that_would_change_the_statistics_around_a_stale_case_is_refused(
        raw_msd: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A training image truncated between two ingests: the other cases would get new CT
    statistics while its stored copy kept the old ones, so the re-run writes nothing (status 2,
    one line naming the store and what changed) and the store keeps one normalisation."""
    raw = shutil.copytree(raw_msd, tmp_path / BAD)
    uri = _store(raw, tmp_path / "out")
    before = {c: TaskStore.open(uri).read_case(c) for c in TaskStore.open(uri).case_ids()}
    norm = TaskStore.open(uri).manifest.normalization
    _truncate(_image(raw))
    assert main(_cli("--source", str(raw), "--out", str(tmp_path / "out"))) == 2
    _one_line(caplog, rf"{uri}: the plan would change \(.*channel 0 mean .*\), but {CASE} would keep")
    store = TaskStore.open(uri)
    assert store.manifest.normalization == norm and len(_recipes(uri)) == 1
    for case_id, arrays in before.items():
        for got, want in zip(store.read_case(case_id), arrays):
            np.testing.assert_array_equal(got, want)


def test_changed_statistics_reingest_every_case(raw_msd: Path, tmp_path: Path) -> None:
    """A valid edit that moves the statistics re-ingests every case under the new plan."""
    raw = shutil.copytree(raw_msd, tmp_path / BAD)
    uri = _store(raw, tmp_path / "out")
    old = _recipes(uri)
    _brighten(raw)
    assert main(_cli("--source", str(raw), "--out", str(tmp_path / "out"))) == 0
    assert len(_recipes(uri)) == 1 and _recipes(uri) != old


@pytest.mark.catalogue("plan-change-drop")
def test_case_failing_after_the_plan_changed_loses_its_old_copy(
        raw_msd: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A test image (not in the plan pass) truncated while a training edit moves the statistics:
    its stored copy, normalised the old way, is removed and the case listed as failed."""
    raw = shutil.copytree(raw_msd, tmp_path / BAD)
    uri = _store(raw, tmp_path / "out")
    _brighten(raw)
    _truncate(_test_image(raw))
    assert main(_cli("--source", str(raw), "--out", str(tmp_path / "out"))) == 2
    _one_line(caplog, rf"{uri}: removed the stored copy of {TEST_CASE}: it was preprocessed under the earlier plan")
    store = TaskStore.open(uri)
    assert TEST_CASE not in store.case_ids() and list(store.manifest.failed) == [TEST_CASE]
    assert store.manifest.stale == {} and len(_recipes(uri)) == 1


def _in_namespace(tmp_path: Path, mount: str, args: list[str], then: str = "true") -> subprocess.CompletedProcess:
    """Run the ingest CLI as root of a user + mount namespace with `tmp_path/out` a fresh tmpfs,
    then the shell command `then` (the tmpfs is gone afterwards)."""
    out = tmp_path / "out"
    out.mkdir()
    script = (f"mount -t tmpfs -o {mount} tmpfs {out} || exit 99; {sys.executable} -m pipeline.ingest "
              f"{' '.join(args)}; status=$?; {then}; exit $status")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=180,
                          cwd=ROOT)


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_namespace = pytest.mark.skipif(not _can_unshare(), reason="unshare -rm (user + mount namespace) not allowed")


@pytest.mark.catalogue("out-unwritable")
@needs_namespace
def test_read_only_output_is_refused_before_any_work(raw_msd: Path, tmp_path: Path) -> None:
    result = _in_namespace(tmp_path, "ro", ["--source", str(raw_msd), "--out", str(tmp_path / "out"),
                                            "--scheduler", "synchronous"])
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(f"{tmp_path / 'out'}: output folder is not writable "
                                                   "(Read-only file system)"), result.stderr
    assert "Traceback" not in result.stderr and "target spacing" not in result.stderr


@pytest.mark.catalogue("disk-full")
@needs_namespace
def test_disk_full_names_the_store_and_the_store_says_it_is_incomplete(raw_msd: Path, tmp_path: Path) -> None:
    """About two cases fit: the failed writes name the store, not a source file, and what is left
    is never a store that opens as complete."""
    out, copy = tmp_path / "out", tmp_path / "copy"
    result = _in_namespace(tmp_path, "size=160k", ["--source", str(raw_msd), "--out", str(out),
                                                   "--scheduler", "synchronous"], then=f"cp -a {out} {copy}")
    assert result.returncode == 1, result.stderr
    store = f"{out}/{raw_msd.name}.zarr"
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert any(f"{store}: cannot write case " in e and e.endswith("No space left on device") for e in errors), errors
    assert not any("No space" in e and str(raw_msd) in e.split(": ")[0] for e in errors), errors
    assert "Traceback" not in result.stderr
    uri = str(copy / f"{raw_msd.name}.zarr")
    try:
        store_left = TaskStore.open(uri)
    except StoreError as err:
        assert "no manifest" in str(err)
    else:
        assert store_left.manifest.failed, "a store missing cases opened as complete"
        with pytest.raises(StoreError, match="did not finish cleanly"):
            TaskStore.open(uri, allow_incomplete=False)
