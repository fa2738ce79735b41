"""dataset.json in MSD, MONAI datalist and nnU-Net v2 form, case listing, and the plan's pure parts."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.common.config import IngestConfig
from pipeline.common.store import TaskStore
from pipeline.datasets.synthetic import Layout, SyntheticTask, write_task
from pipeline.ingest.dataset import DatasetError, content_fingerprint, read_dataset, stat_signature
from pipeline.ingest.plan import CaseSummary, make_plan, target_spacing
from pipeline.ingest.run import run
from test_ingest_split import write_test_labels

DIALECT = SyntheticTask("Task08_Dialect", ("CT",), ("background", "organ"), spacing=(2.0, 2.0, 4.0),
                        shape=(16, 16, 16), num_cases=2, num_test_cases=1)
TRAIN, TEST = ["dialect_000", "dialect_001"], "dialect_002"


def test_msd_layout(raw_msd: Path) -> None:
    spec = read_dataset(raw_msd)
    assert (spec.layout, spec.name, spec.modalities, spec.file_ending) == ("msd", raw_msd.name, ("CT",), ".nii.gz")
    assert spec.labels == {0: "background", 1: "liver", 2: "tumour"}
    assert [c.case_id for c in spec.train_cases] == [f"tinyliver_00{i}" for i in range(4)]
    test = [c for c in spec.cases if c.is_test]
    assert [(c.case_id, c.label) for c in test] == [("tinyliver_004", None)]
    assert all(len(c.images) == 1 and not c.problems for c in spec.cases)


def test_nnunet_v2_layout(raw_nnunet: Path) -> None:
    spec = read_dataset(raw_nnunet)
    assert (spec.layout, spec.modalities) == ("nnunetv2", ("T2", "ADC"))
    assert spec.labels == {0: "background", 1: "peripheral zone", 2: "transition zone"}
    first = spec.cases[0]
    assert [p.name for p in first.images] == ["tinyprostate_000_0000.nii.gz", "tinyprostate_000_0001.nii.gz"]
    assert first.label.name == "tinyprostate_000.nii.gz"
    assert [c.is_test for c in spec.cases] == [False] * 3 + [True]


def test_msd_entries_with_per_channel_files(raw_msd: Path, tmp_path: Path) -> None:
    """nnU-Net-converted MSD: dataset.json names `case.nii.gz`, the folder holds `case_0000.nii.gz`."""
    root = shutil.copytree(raw_msd, tmp_path / raw_msd.name)
    for path in (root / "imagesTr").glob("*.nii.gz"):
        path.rename(path.with_name(path.name.replace(".nii.gz", "_0000.nii.gz")))
    (root / "labelsTr" / "tinyliver_002.nii.gz").unlink()
    spec = read_dataset(root)
    assert spec.cases[0].images == (root / "imagesTr" / "tinyliver_000_0000.nii.gz",)
    assert spec.cases[2].problems == (f"{root}/labelsTr/tinyliver_002.nii.gz: missing label for case tinyliver_002",)


def _monai(meta: dict, test_labels: bool) -> None:
    """A MONAI datalist: entries as objects with a `fold` key; test labels (when given) at ./labelsTest/."""
    meta["training"] = [entry | {"fold": i % 2} for i, entry in enumerate(meta["training"])]
    meta["test"] = [{"image": path, "fold": 0} for path in meta["test"]]
    if test_labels:
        for entry in meta["test"]:
            entry["label"] = entry["image"].replace("imagesTs", "labelsTest")


@dataclass(frozen=True)
class Dialect:
    """One dataset.json dialect: the synthetic layout it starts from and how its dataset.json is
    changed; `test_labels`: the test entry names its label file."""

    name: str
    layout: Layout
    edit: Callable[[dict], object]
    test_labels: bool = False


DIALECTS = [
    Dialect("MSD lists of paths", "msd", lambda m: None),
    Dialect("MONAI objects with extra keys", "msd", lambda m: _monai(m, test_labels=False)),
    Dialect("MONAI test entries with labels", "msd", lambda m: _monai(m, test_labels=True), test_labels=True),
    Dialect("nnU-Net v2", "nnunetv2", lambda m: None),
    Dialect("MSD with name -> id labels", "msd", lambda m: m.update(labels={"background": 0, "organ": 1})),
    Dialect("nnU-Net v2 with id -> name labels", "nnunetv2",
            lambda m: m.update(labels={"0": "background", "1": "organ"})),
]


@pytest.fixture(scope="module")
def dialect_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny dialect task in each synthetic layout, with test labels in labelsTest/ (read-only)."""
    sources = {}
    for layout in ("msd", "nnunetv2"):
        sources[layout] = write_task(tmp_path_factory.mktemp(layout), DIALECT, layout)
        write_test_labels(sources[layout], DIALECT)
        (sources[layout] / "labelsTs").rename(sources[layout] / "labelsTest")
    return sources


@pytest.mark.parametrize("dialect", DIALECTS, ids=[d.name for d in DIALECTS])
def test_every_dialect_is_ingested(dialect: Dialect, dialect_sources: dict[str, Path], tmp_path: Path) -> None:
    raw = shutil.copytree(dialect_sources[dialect.layout], tmp_path / DIALECT.name)
    meta = json.loads((raw / "dataset.json").read_text())
    dialect.edit(meta)
    (raw / "dataset.json").write_text(json.dumps(meta))
    spec = read_dataset(raw)
    assert spec.labels == {0: "background", 1: "organ"}
    assert [(c.case_id, c.is_test, c.label is not None) for c in spec.cases] == [
        (TRAIN[0], False, True), (TRAIN[1], False, True), (TEST, True, dialect.test_labels)]
    assert run([raw], str(tmp_path / "out"), IngestConfig(scheduler="synchronous")).ok
    store = TaskStore.open(str(tmp_path / "out" / f"{DIALECT.name}.zarr"))
    assert sorted(store.case_ids("train") + store.case_ids("validation")) == TRAIN
    assert store.case_ids("test") == [TEST] and store.manifest.labels == {0: "background", 1: "organ"}
    image, label = store.read_case(TEST)
    if dialect.test_labels:
        assert label is not None and label.shape == image.shape[1:] and label.max() == 1
        assert store.case_sources(TEST)[-1] == f"labelsTest/{TEST}.nii.gz"
    else:
        assert label is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "dataset.json not found"),
        ("[1, 2]", "must hold an object"),
        ('{"modality": {"0": "CT"}, "labels": {"0": "bg", "1": "a"}, "training": {}}',
         "dataset.json: training: Input should be a valid list"),
        ('{"modality": {"0": "CT"}, "labels": {"0": "bg", "1": "a"}, "training": [{"image": null, "label": "l"}]}',
         r"dataset.json: training.0.image: Input should be a valid string \(got None\)$"),
        ('{"modality": {"0": "CT"}, "labels": {"0": "bg", "1": "a"}, "test": ["a.nii.gz", 3]}',
         r"dataset.json: test.1: Input should be a file path or an object with an 'image' key \(got 3\)$"),
        ('{"modality": {"0": "CT"}, "labels": {"0": "bg", "1": "a"}, "test": [{"label": "l.nii.gz"}]}',
         "dataset.json: test.0.image: Field required$"),
        ('{"modality": {"0": "CT"}}', "dataset.json: labels: Field required$"),
        ('{"modality": {"1": "CT"}, "labels": {"0": "bg", "1": "a"}}', "indices must be 0..0"),
        ('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": [1, 2]}}',
         r"dataset.json: labels.a: region-based label \[1, 2\] is not supported \(one integer id per class\)$"),
        ('{"modality": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 1}}',
         r"dataset.json: labels: ids \[1\] given to more than one class"),
        ('{"modality": {"0": "CT"}, "labels": {"background": 0, "a": "1"}}',
         r"dataset.json: labels: must map id -> name \(.*\) or name -> id \(.*\), got"),
        ('{"modality": {"0": "CT"}, "labels": {"0": "bg"}}', "2 <= N <= 256"),
        ('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}}', "no training cases found"),
        ('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "file_ending": ".mha"}',
         "file_ending '.mha' is not supported"),
    ],
)
def test_bad_dataset_json(tmp_path: Path, text: str | None, message: str) -> None:
    if text is not None:
        (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_dataset(tmp_path)


def test_fingerprints_follow_files(raw_msd: Path, tmp_path: Path) -> None:
    root = shutil.copytree(raw_msd, tmp_path / raw_msd.name)
    cases = read_dataset(root).cases
    before = [(content_fingerprint(c), stat_signature(c)) for c in cases]
    assert len(set(before)) == len(before)
    label = root / "labelsTr" / "tinyliver_001.nii.gz"
    (root / "labelsTr" / "tinyliver_001.nii.gz").write_bytes(b"changed")
    after = [(content_fingerprint(c), stat_signature(c)) for c in cases]
    assert [a != b for a, b in zip(before, after)] == [False, True, False, False, False]
    # An in-place edit of the same size with the modification time put back: only the content hash sees it.
    stat = label.stat()
    label.write_bytes(b"chanGed")
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = [(content_fingerprint(c), stat_signature(c)) for c in cases]
    assert edited[1][0] != after[1][0] and edited[1][1] == after[1][1]


def test_duplicate_case_ids_name_both_files(raw_msd: Path, tmp_path: Path) -> None:
    """Two training entries with one case id (from two folders) used to collapse silently."""
    root = shutil.copytree(raw_msd, tmp_path / raw_msd.name)
    (root / "other").mkdir()
    shutil.copy(root / "imagesTr" / "tinyliver_001.nii.gz", root / "other" / "tinyliver_001.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append({"image": "./other/tinyliver_001.nii.gz", "label": "./labelsTr/tinyliver_001.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"dataset.json: case id 'tinyliver_001' given twice: "
                                           r"\S*imagesTr/tinyliver_001.nii.gz and \S*other/tinyliver_001.nii.gz"):
        read_dataset(root)


def test_a_case_id_in_both_train_and_test_folders_is_a_duplicate(raw_nnunet: Path, tmp_path: Path) -> None:
    root = shutil.copytree(raw_nnunet, tmp_path / raw_nnunet.name)
    for channel in ("0000", "0001"):
        shutil.copy(root / "imagesTr" / f"tinyprostate_000_{channel}.nii.gz", root / "imagesTs")
    with pytest.raises(DatasetError, match="case id 'tinyprostate_000' given twice: .*imagesTr/.* and .*imagesTs/"):
        read_dataset(root)


def test_nnunet_label_without_image_is_a_case_with_a_missing_image(raw_nnunet: Path, tmp_path: Path) -> None:
    root = shutil.copytree(raw_nnunet, tmp_path / raw_nnunet.name)
    for path in (root / "imagesTr").glob("tinyprostate_001_*"):
        path.unlink()
    case = next(c for c in read_dataset(root).cases if c.case_id == "tinyprostate_001")
    assert case.problems and "missing image" in case.problems[0]


def test_target_spacing_is_the_median() -> None:
    assert target_spacing([(1.0, 1.0, 1.0), (2.0, 0.8, 0.8), (3.0, 0.9, 0.7)], [(100, 100, 100)] * 3) == (2.0, 0.9, 0.8)


def test_target_spacing_anisotropic_rule() -> None:
    # Coarse z (median 5 mm > 3 x 0.8) and few slices (median 20 * 3 < 256): z takes its 10th percentile.
    spacings = [(5.0, 0.8, 0.8)] * 8 + [(1.5, 0.8, 0.8), (1.0, 0.8, 0.8)]
    expected = float(np.percentile([s[0] for s in spacings], 10))
    assert target_spacing(spacings, [(20, 256, 256)] * 10) == (expected, 0.8, 0.8)
    # ... but never finer than the in-plane spacing.
    fine = [(5.0, 0.8, 0.8)] * 8 + [(0.5, 0.8, 0.8)] * 2
    assert target_spacing(fine, [(20, 256, 256)] * 10)[0] == pytest.approx(0.8 + 1e-5)
    # Many slices: not treated as anisotropic, plain median.
    assert target_spacing(spacings, [(200, 256, 256)] * 10) == (5.0, 0.8, 0.8)


def test_make_plan_pools_ct_foreground(raw_msd: Path) -> None:
    spec = read_dataset(raw_msd)
    summaries = [CaseSummary("a", (2.0, 1.0, 1.0), (10, 10, 10), (np.arange(0.0, 100.0),)),
                 CaseSummary("b", (4.0, 1.0, 1.0), (10, 10, 10), (np.arange(100.0, 201.0),))]
    plan = make_plan(summaries, spec, IngestConfig())
    norm = plan.normalization[0]
    assert plan.target_spacing == (3.0, 1.0, 1.0)
    assert (norm.scheme, norm.mean, norm.lower, norm.upper) == ("ct-clip-zscore", 100.0, 1.0, 199.0)
    given = make_plan(summaries, spec, IngestConfig(target_spacing=(1.0, 2.0, 3.0), ct_normalization="uniseg-window"))
    assert given.target_spacing == (1.0, 2.0, 3.0) and given.normalization[0].scheme == "ct-window"
    with pytest.raises(ValueError, match="no valid training case"):
        make_plan([], spec, IngestConfig())


def test_a_source_given_as_dot_is_named_after_its_folder(raw_msd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(raw_msd)
    assert read_dataset(Path(".")).name == raw_msd.name
