"""Cross-validation folds of a store: balanced, seeded, stable per case when the case set changes;
test cases keep their labelsTs labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib

from pipeline.common.config import IngestConfig
from pipeline.common.store import TaskStore
from pipeline.datasets.synthetic import SyntheticTask, generate_case, oriented_nifti, write_task
from pipeline.ingest.run import run
from pipeline.ingest.split import FoldAssignment, assign_folds, fold_lists

SYNC = IngestConfig(scheduler="synchronous")
TWENTY = SyntheticTask("Task07_Twenty", ("CT",), ("background", "organ"), spacing=(2.0, 2.0, 4.0),
                       shape=(16, 16, 16), num_cases=20, num_test_cases=2)


def write_test_labels(task_dir: Path, task: SyntheticTask) -> list[Path]:
    """labelsTs/<case>.nii.gz for the task's test cases (nnU-Net layout)."""
    (task_dir / "labelsTs").mkdir(exist_ok=True)
    paths = []
    for index in range(task.num_cases, task.num_cases + task.num_test_cases):
        case = generate_case(task, index)
        path = task_dir / "labelsTs" / f"{task.case_prefix}_{index:03d}.nii.gz"
        nib.save(oriented_nifti(case.label, case.affine, case.orientation), path)
        paths.append(path)
    return paths


def test_first_draw_is_balanced_seeded_and_order_free() -> None:
    ids = [f"c{i:02d}" for i in range(23)]
    record = assign_folds(ids, 5, seed=0, recorded=None)
    folds = fold_lists(record, ids)
    assert sorted(len(f) for f in folds) == [4, 4, 5, 5, 5]
    assert sorted(c for f in folds for c in f) == ids
    assert assign_folds(list(reversed(ids)), 5, 0, None) == record
    assert assign_folds(ids, 5, 1, None).assignment != record.assignment


def test_few_cases_give_as_many_folds_as_cases_and_one_case_none() -> None:
    three = fold_lists(assign_folds(["a", "b", "c"], 5, 0, None), ["a", "b", "c"])
    assert sorted(three) == [["a"], ["b"], ["c"]]
    assert fold_lists(assign_folds(["a"], 5, 0, None), ["a"]) == []


def test_changes_of_the_case_set_move_no_other_case() -> None:
    ids = [f"c{i:02d}" for i in range(20)]
    first = assign_folds(ids, 5, 0, None)
    for changed in (ids[:7] + ids[8:], ids + ["new"], ids[1:] + ["new"]):
        again = assign_folds(changed, 5, 0, first)
        assert {c: again.assignment[c] for c in ids if c in changed} == {c: first.assignment[c] for c in ids if c in changed}
    # A case that left and came back returns to its fold; the new case goes to a smallest fold.
    gone = assign_folds(ids[1:], 5, 0, first)
    back = assign_folds(ids + ["new"], 5, 0, gone)
    assert back.assignment["c00"] == first.assignment["c00"]
    assert [len(f) for f in fold_lists(back, ids + ["new"])].count(5) == 1
    # Grown from fewer cases than folds: the new folds fill first.
    small = assign_folds(["a", "b"], 5, 0, None)
    grown = assign_folds(["a", "b", "c", "d", "e"], 5, 0, small)
    assert sorted(map(len, fold_lists(grown, ["a", "b", "c", "d", "e"]))) == [1] * 5
    assert FoldAssignment.from_dict(grown.to_dict()) == grown


def _folds_by_case(store: TaskStore) -> dict[str, int]:
    return {c: i for i, fold in enumerate(store.manifest.folds) for c in fold}


def test_store_folds_stay_when_a_case_is_dropped_or_fails(tmp_path: Path) -> None:
    raw = write_task(tmp_path / "raw", TWENTY)
    labels_ts = write_test_labels(raw, TWENTY)
    out = str(tmp_path / "stores")
    assert run([raw], out, SYNC).ok
    uri = str(tmp_path / "stores" / f"{raw.name}.zarr")
    store = TaskStore.open(uri)
    before = _folds_by_case(store)
    assert len(before) == 20 and [len(f) for f in store.manifest.folds] == [4] * 5
    assert store.case_ids("validation") == sorted(store.manifest.folds[0])
    # Test cases carry their labelsTs labels.
    assert store.case_ids("test") == ["twenty_020", "twenty_021"]
    image, label = store.read_case("twenty_020")
    assert label is not None and label.shape == image.shape[1:] and label.max() == 1
    assert store.case_sources("twenty_020")[-1] == str(labels_ts[0].relative_to(raw))
    # Another fold held out: a fold's validation cases, the others train.
    fold3 = TaskStore.open(uri, fold=3)
    assert fold3.case_ids("validation") == sorted(store.manifest.folds[3])
    assert sorted(fold3.case_ids("train") + fold3.case_ids("validation")) == sorted(before)

    # Drop one case from the source, make another fail: no other case moves.
    meta = json.loads((raw / "dataset.json").read_text())
    dropped = meta["training"].pop(5)
    (raw / "dataset.json").write_text(json.dumps(meta))
    failing = raw / "labelsTr" / "twenty_011.nii.gz"
    shutil.copy(raw / "imagesTr" / "twenty_011.nii.gz", failing)  # float CT values: not a label map
    report = run([raw], out, SYNC).datasets[0]
    assert list(report.failed) == ["twenty_011"]
    after = _folds_by_case(TaskStore.open(uri))
    gone = {Path(dropped["image"]).name.split(".")[0], "twenty_011"}
    assert {c: f for c, f in after.items() if c not in gone} == {c: f for c, f in before.items() if c not in gone}

    # Both come back: to their old folds.
    meta["training"].append(dropped)
    (raw / "dataset.json").write_text(json.dumps(meta))
    case = generate_case(TWENTY, 11)
    nib.save(oriented_nifti(case.label, case.affine, case.orientation), failing)
    assert run([raw], out, SYNC).ok
    assert _folds_by_case(TaskStore.open(uri)) == before
