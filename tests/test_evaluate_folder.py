"""Folder evaluation: hand-computed Dice, FP/FN counts and HD95 on built label maps, both
empty-reference rules, the grid checks (one line per mismatch) and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.evaluate.__main__ import main
from pipeline.evaluate.folder import FolderOptions, run_folder, score_folder

AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])
SHAPE = (10, 12, 14)
LABELS = {"name": "Hand", "labels": {"background": 0, "organ": 1, "lesion": 2}}  # nnU-Net form


def _map(*boxes: tuple[int, tuple[slice, slice, slice]], shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    for value, box in boxes:
        labels[box] = value
    return labels


def _save(folder: Path, case: str, labels: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, affine), folder / f"{case}.nii.gz")


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Three cases with known answers:
    a: organ 27 voxels, predicted shifted by one slice (18 shared): Dice 36/54, FP 9, FN 9;
       lesion 8 voxels, missed: Dice 0, FN 8.
    b: organ exact (Dice 1); no lesion in the reference, 2 predicted: nnU-Net Dice 0 (FP 2), MONAI NaN.
    c: organ exact; lesion in neither: NaN under both rules.
    """
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    organ = (1, np.s_[2:5, 2:5, 2:5])
    _save(ref, "a", _map(organ, (2, np.s_[6:8, 6:8, 6:8])))
    _save(pred, "a", _map((1, np.s_[3:6, 2:5, 2:5])))
    _save(ref, "b", _map(organ))
    _save(pred, "b", _map(organ, (2, np.s_[8, 8, 0:2])))
    _save(ref, "c", _map(organ))
    _save(pred, "c", _map(organ))
    (tmp_path / "dataset.json").write_text(json.dumps(LABELS))
    return pred, ref, tmp_path / "dataset.json"


def _by_case(rows: list) -> dict[tuple[str, str], object]:
    return {(r.case, r.metrics.name): r.metrics for r in rows}


def test_hand_computed_dice_counts_and_empty_rules(folders: tuple[Path, Path, Path]) -> None:
    pred, ref, labels = folders
    rows = _by_case(score_folder(pred, ref, labels))
    organ_a, lesion_a = rows["a", "organ"], rows["a", "lesion"]
    assert organ_a.dice == pytest.approx(2 * 18 / 54)
    assert (organ_a.false_positives, organ_a.false_negatives) == (9, 9)
    assert organ_a.hd95 == pytest.approx(2.0)  # one slice along the 2 mm axis
    assert (lesion_a.dice, lesion_a.false_negatives, lesion_a.false_positives) == (0.0, 8, 0)
    assert rows["b", "organ"].dice == 1.0
    assert (rows["b", "lesion"].dice, rows["b", "lesion"].false_positives) == (0.0, 2)  # nnU-Net rule
    assert math.isnan(rows["c", "lesion"].dice)
    monai = _by_case(score_folder(pred, ref, labels, empty="monai"))
    assert math.isnan(monai["b", "lesion"].dice) and math.isnan(monai["c", "lesion"].dice)
    assert monai["a", "organ"].dice == organ_a.dice
    # Without a dataset.json the classes are the values found, named by id.
    assert {name for _, name in _by_case(score_folder(pred, ref))} == {"class 1", "class 2"}


def test_report_files_and_nnunet_summary(folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    pred, ref, labels = folders
    result = run_folder(FolderOptions(pred, ref, tmp_path / "report", labels))
    assert [f.name for f in result.files] == ["metrics.csv", "summary.md", "summary.json", "boxplot_ref.png"]
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [c["case"] for c in summary["metric_per_case"]] == ["a", "b", "c"]
    assert summary["metric_per_case"][1]["metrics"]["2"] == {"Dice": 0.0, "HD95": None, "FP": 2, "FN": 0,
                                                             "n_pred": 2, "n_ref": 0}
    organ = (2 * 18 / 54 + 1 + 1) / 3
    assert summary["mean"]["1"]["Dice"] == pytest.approx(organ)
    assert summary["mean"]["2"]["Dice"] == 0.0 and summary["mean"]["2"]["FN"] == pytest.approx(8 / 3)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(organ / 2)
    assert "| ref | 1 organ | 3 |" in (tmp_path / "report" / "summary.md").read_text()


def test_every_mismatch_is_one_line_and_exit_status_2(folders: tuple[Path, Path, Path], tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    pred, ref, labels = folders
    _save(pred, "a", _map(shape=(10, 12, 13)))
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.5
    _save(pred, "b", _map(), shifted)
    _save(ref, "d", _map())
    _save(pred, "extra", _map())  # no reference: left out with a warning
    status = main(["--pred", str(pred), "--ref", str(ref), "-o", str(tmp_path / "out")])
    assert status == 2 and f"{pred}/d.nii.gz: no prediction for reference {ref}/d.nii.gz" in caplog.text
    caplog.clear()
    (pred / "d.nii.gz").symlink_to(ref / "d.nii.gz")
    status = main(["--pred", str(pred), "--ref", str(ref), "-o", str(tmp_path / "out")])
    lines = [line for line in caplog.text.splitlines() if str(pred) in line and "left out" not in line]
    assert status == 2 and len(lines) == 2
    assert f"{pred}/a.nii.gz: shape (10, 12, 13) != reference {ref}/a.nii.gz shape (10, 12, 14)" in lines[0]
    assert f"{pred}/b.nii.gz: affine differs from reference {ref}/b.nii.gz by up to 0.5 mm" in lines[1]
    assert not (tmp_path / "out").exists()


def test_command_line_scores_a_folder(folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    pred, ref, labels = folders
    out = tmp_path / "cli"
    assert main(["--pred", str(pred), "--ref", str(ref), "--labels", str(labels), "--empty-reference", "monai",
                 "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric_per_case"][1]["metrics"]["2"]["Dice"] is None  # MONAI: not scored


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def _refused(argv: list[str], caplog: pytest.LogCaptureFixture) -> str:
    """Exit status 2 with one logged line (several problems: one line each), which is returned."""
    assert main(argv) == 2
    (error,) = _errors(caplog)
    return error


@pytest.mark.catalogue("folder-label-values")
def test_undeclared_label_values_are_refused_per_file(folders: tuple[Path, Path, Path], tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    pred, ref, labels = folders
    _save(ref, "b", _map((1, np.s_[2:5, 2:5, 2:5]), (7, np.s_[0, 0, 0])))
    _save(pred, "c", _map((3, np.s_[2:5, 2:5, 2:5])))
    error = _refused(["--pred", str(pred), "--ref", str(ref), "--labels", str(labels), "-o", str(tmp_path / "o")],
                     caplog)
    assert error.splitlines() == [f"{ref}/b.nii.gz: label values [7] not declared in {labels}",
                                  f"{pred}/c.nii.gz: label values [3] not declared in {labels}"]
    assert not (tmp_path / "o").exists()


@pytest.mark.catalogue("folder-two-files")
def test_two_files_for_one_case_are_refused(folders: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    pred, ref, _ = folders
    nib.save(nib.load(pred / "a.nii.gz"), pred / "a.nii")
    error = _refused(["--pred", str(pred), "--ref", str(ref)], caplog)
    assert error == f"{pred}/a.nii: case 'a' has 2 files (also a.nii.gz); keep one"


@pytest.mark.catalogue("folder-same")
def test_pred_and_ref_the_same_folder_are_refused(folders: tuple[Path, Path, Path], tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    _, ref, _ = folders
    (tmp_path / "link").symlink_to(ref)
    error = _refused(["--pred", str(tmp_path / "link"), "--ref", str(ref)], caplog)
    assert error == f"{tmp_path / 'link'}: --pred and --ref are the same folder (every case would score 1.0)"


@pytest.mark.catalogue("folder-unreadable")
@pytest.mark.parametrize("damage", ["truncated", "not NIfTI"])
def test_unreadable_or_truncated_nifti_is_one_line(folders: tuple[Path, Path, Path], damage: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    pred, ref, _ = folders
    _save(ref, "b", np.random.default_rng(0).integers(0, 3, SHAPE, dtype=np.uint8))  # a long gzip stream
    data = (ref / "b.nii.gz").read_bytes()
    (ref / "b.nii.gz").write_bytes(data[:-64] if damage == "truncated" else b"not a NIfTI file")
    error = _refused(["--pred", str(pred), "--ref", str(ref)], caplog)
    problem = "corrupt NIfTI data" if damage == "truncated" else "not a readable NIfTI file"
    assert error.startswith(f"{ref}/b.nii.gz: {problem} (") and "\n" not in error


@pytest.mark.catalogue("folder-affine")
def test_singular_affine_is_refused_per_file(folders: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    pred, ref, _ = folders
    for folder in (pred, ref):  # prediction and reference on the same (singular) grid: only the affine is wrong
        image = nib.load(folder / "b.nii.gz")
        header = image.header.copy()
        header.set_sform(image.affine @ np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
        header.set_qform(None, code=0)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), None, header), folder / "b.nii.gz")
    error = _refused(["--pred", str(pred), "--ref", str(ref)], caplog)
    singular = "singular affine (voxel sizes 2, 1, 0 mm, axes not independent)"
    assert [line.split(";")[0] for line in error.splitlines()] == [f"{pred}/b.nii.gz: {singular}",
                                                                   f"{ref}/b.nii.gz: {singular}"]


@pytest.mark.catalogue("folder-out-file")
def test_existing_file_as_output_is_refused_before_scoring(folders: tuple[Path, Path, Path], tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.evaluate.folder

    def no_scoring(*args: object) -> None:
        raise AssertionError("scoring started before the output was checked")

    monkeypatch.setattr(pipeline.evaluate.folder, "class_metrics", no_scoring)
    pred, ref, _ = folders
    (tmp_path / "report.txt").write_text("keep me")
    error = _refused(["--pred", str(pred), "--ref", str(ref), "-o", str(tmp_path / "report.txt")], caplog)
    assert error == f"{tmp_path / 'report.txt'}: exists and is a file, not a folder"
    assert (tmp_path / "report.txt").read_text() == "keep me"


OPTION_ORDER = ["--model", "--folds", "--split", "--space", "--no-mlflow", "--tta", "--device"]  # the parser's


@pytest.mark.parametrize("options", [["--folds", "0"], ["--split", "val"], ["--tta", "on"], ["--device", "cpu"],
                                     ["--model", "models:/x@y"], ["--no-mlflow", "--space", "store"]])
@pytest.mark.catalogue("evaluate-other-mode")
def test_model_options_are_refused_in_folder_mode(folders: tuple[Path, Path, Path], options: list[str],
                                                  capsys: pytest.CaptureFixture) -> None:
    pred, ref, _ = folders
    with pytest.raises(SystemExit) as exit_info:
        main(["--pred", str(pred), "--ref", str(ref), *options])
    named = ", ".join(sorted((o for o in options if o.startswith("--")), key=OPTION_ORDER.index))
    assert exit_info.value.code == 2
    assert f"error: {named}: not for folder evaluation (--pred DIR --ref DIR takes only" in capsys.readouterr().err


@pytest.mark.catalogue("evaluate-other-mode")
def test_labels_are_refused_in_model_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path), "--store", str(tmp_path), "--labels", str(tmp_path / "dataset.json")])
    assert exit_info.value.code == 2 and "error: --labels: only for folder evaluation" in capsys.readouterr().err


@pytest.mark.catalogue("folder-no-reference")
def test_predictions_without_a_reference_are_left_out_with_a_warning(
        folders: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pred, ref, labels = folders
    _save(pred, "x", _map())
    _save(pred, "y", _map())
    assert main(["--pred", str(pred), "--ref", str(ref), "--labels", str(labels), "-o", str(tmp_path / "out")]) == 0
    assert f"{pred}: 2 prediction(s) without a reference left out: x, y" in caplog.text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {row["case"] for row in summary["metric_per_case"]} == {"a", "b", "c"}
