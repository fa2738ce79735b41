"""`pipeline.predict` end to end on a tiny trained, registered model (see test_predict_world.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest

from pipeline.common.inference import InferenceOptions
from pipeline.common.metrics import dice
from pipeline.common.nifti import from_bytes
from pipeline.evaluate.run import EvaluateOptions
from pipeline.evaluate.run import run as evaluate
from pipeline.predict.__main__ import parse_args
from pipeline.predict.io import PredictError
from pipeline.predict.run import PredictOptions, run
from test_predict_world import LIVER, World, single_thread, world  # noqa: F401 (fixtures)

FAST = InferenceOptions(mirror_axes=())
LIVER_TASK = LIVER.name
VALIDATION_CASE = "synthliver_002"  # saved as ASL (ORIENTATIONS[2 % 3]), anisotropic 1.5 x 1.5 x 5 mm


def _image(world: World, case: str = VALIDATION_CASE) -> Path:
    return world.raw[LIVER_TASK] / "imagesTr" / f"{case}.nii.gz"


def _label(world: World, case: str = VALIDATION_CASE) -> Path:
    return world.raw[LIVER_TASK] / "labelsTr" / f"{case}.nii.gz"


def _options(world: World, source: Path, output: Path, **changes: object) -> PredictOptions:
    defaults = dict(model=str(world.model_dir), task=LIVER_TASK, input=source, output=output, inference=FAST,
                    tracking_uri=world.tracking_uri)
    return PredictOptions(**(defaults | changes))


def test_predict_from_registry_gives_input_grid_and_evaluate_dice(world: World, tmp_path: Path) -> None:
    source = nib.load(_image(world))
    assert nib.aff2axcodes(source.affine) == ("A", "S", "L")
    written = run(_options(world, _image(world), tmp_path / "out", model=world.model_uri))
    assert sorted(p.name for p in written) == [f"{VALIDATION_CASE}.json", f"{VALIDATION_CASE}.nii.gz"]
    output = nib.load(tmp_path / "out" / f"{VALIDATION_CASE}.nii.gz")
    assert output.shape == source.shape and output.get_data_dtype() == np.uint8
    np.testing.assert_allclose(output.affine, source.affine, atol=1e-6)
    predicted = np.asarray(output.dataobj)
    liver_dice = dice(predicted, np.asarray(nib.load(_label(world)).dataobj), 1)
    assert liver_dice > 0.7

    report = evaluate(EvaluateOptions(model=world.model_uri, stores=(world.stores[LIVER_TASK],),
                                      output=tmp_path / "eval", split="val", inference=FAST,
                                      tracking_uri=world.tracking_uri))
    (row,) = [r for r in report.rows if r.case == VALIDATION_CASE and r.metrics.class_id == 1]
    assert row.metrics.dice == pytest.approx(liver_dice, abs=1e-6)
    logged = mlflow.MlflowClient(world.tracking_uri).get_run(report.run_id).data.metrics
    assert logged[f"eval/validation/{LIVER_TASK}/liver/dice"] == pytest.approx(
        np.mean([r.metrics.dice for r in report.rows if r.metrics.class_id == 1]))


def test_task_all_runs_matching_tasks_and_merges(world: World, tmp_path: Path) -> None:
    run(_options(world, _image(world), tmp_path / "all", task="all", modalities=("ct",), save_probabilities=True))
    run(_options(world, _image(world), tmp_path / "liver"))
    sidecar = json.loads((tmp_path / "all" / f"{VALIDATION_CASE}.json").read_text())
    assert sidecar["tasks"] == [LIVER_TASK, "Task02_SynthSpleen"]  # not the 2-channel prostate task
    assert sidecar["labels"] == {"0": "background", "1": f"{LIVER_TASK}/liver", "2": f"{LIVER_TASK}/tumour",
                                 "3": "Task02_SynthSpleen/spleen"}
    merged = np.asarray(nib.load(tmp_path / "all" / f"{VALIDATION_CASE}.nii.gz").dataobj)
    liver = np.asarray(nib.load(tmp_path / "liver" / f"{VALIDATION_CASE}.nii.gz").dataobj)
    assert set(np.unique(merged)) <= {0, 1, 2, 3}
    kept = merged != 3  # where spleen did not win, the liver task's labels stand
    np.testing.assert_array_equal(merged[kept & (liver > 0)], liver[kept & (liver > 0)])
    assert dice(merged, np.asarray(nib.load(_label(world)).dataobj), 1) > 0.7
    probabilities = nib.load(tmp_path / "all" / f"{VALIDATION_CASE}_Task02_SynthSpleen_probabilities.nii.gz")
    assert probabilities.shape == (*merged.shape, 2)


def test_folder_of_scans_and_overwrite(world: World, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in ("synthliver_000", "synthliver_001"):
        (inputs / f"{case}.nii.gz").symlink_to(_image(world, case))
    (inputs / "notes.txt").write_text("not a scan")  # other files in a folder are not scans
    run(_options(world, inputs, tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "synthliver_000.json", "synthliver_000.nii.gz", "synthliver_001.json", "synthliver_001.nii.gz"]
    exists = "synthliver_000.nii.gz: output already exists (and 3 more); pass --overwrite"
    with pytest.raises(PredictError, match=re.escape(exists)):
        run(_options(world, inputs, tmp_path / "out"))
    run(_options(world, inputs, tmp_path / "out", overwrite=True))


def test_resume_keeps_finished_scans_and_redoes_partial_ones(world: World, tmp_path: Path) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for case in ("synthliver_000", "synthliver_001"):
        (inputs / f"{case}.nii.gz").symlink_to(_image(world, case))
    run(_options(world, inputs, out))
    finished = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "synthliver_001.json").unlink()  # a run stopped between this scan's renames
    written = run(_options(world, inputs, out, resume=True))
    assert sorted(p.name for p in written) == ["synthliver_001.json", "synthliver_001.nii.gz"]
    assert {n: (out / n).stat().st_mtime_ns for n in ("synthliver_000.json", "synthliver_000.nii.gz")} == {
        n: finished[n] for n in ("synthliver_000.json", "synthliver_000.nii.gz")}
    assert run(_options(world, inputs, out, resume=True)) == []
    assert parse_args(["--model", "m", "--task", "t", "-i", "a", "-o", "b", "--resume"]).resume


def test_pyfunc_on_a_raw_nifti_path(world: World, tmp_path: Path) -> None:
    mlflow.set_tracking_uri(world.tracking_uri)
    model = mlflow.pyfunc.load_model(world.model_uri)
    by_path, by_bytes = model.predict([{"path": str(_image(world)), "task": LIVER_TASK},
                                       {"image": _image(world).read_bytes(), "task": LIVER_TASK}]).to_dict("records")
    run(_options(world, _image(world), tmp_path, inference=InferenceOptions()))  # pyfunc: default options
    written = nib.load(tmp_path / f"{VALIDATION_CASE}.nii.gz")
    for row in (by_path, by_bytes):
        labels = from_bytes(row["labels"])
        np.testing.assert_array_equal(np.asarray(labels.dataobj), np.asarray(written.dataobj))
        np.testing.assert_allclose(labels.affine, written.affine, atol=1e-6)
        np.testing.assert_allclose(row["affine"], written.affine, atol=1e-6)
        assert labels.get_data_dtype() == np.uint8 and json.loads(row["classes"])["1"] == "liver"


def test_sheared_affine_keeps_the_input_qform_and_sform(world: World, tmp_path: Path) -> None:
    source = nib.load(_image(world))
    sform = source.affine.copy()
    sform[0, 1] = 0.3 * sform[1, 1]  # shear: x grows along y; a qform cannot hold it
    image = nib.Nifti1Image(np.asarray(source.dataobj), sform)
    image.set_qform(source.affine, code=1)
    image.set_sform(sform, code=2)
    nib.save(image, tmp_path / "sheared.nii.gz")
    run(_options(world, tmp_path / "sheared.nii.gz", tmp_path / "out"))
    written = nib.load(tmp_path / "out" / "sheared.nii.gz").header
    for form in ("qform", "sform"):
        matrix, code = getattr(written, f"get_{form}")(coded=True)
        expected, expected_code = getattr(image.header, f"get_{form}")(coded=True)
        assert code == expected_code
        np.testing.assert_allclose(matrix, expected, atol=1e-5)
    for field in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"):
        assert written[field] == pytest.approx(image.header[field], abs=1e-6), field


def test_cli_options() -> None:
    options = parse_args(["--model", "m", "--task", "all", "-i", "in", "-o", "out", "--modality", "CT, PET",
                          "--overlap", "0.25", "--tta", "off", "--num-workers", "3"])
    assert options.modalities == ("CT", "PET") and options.inference.overlap == 0.25
    assert options.inference.mirror_axes == () and options.ray.num_workers == 3
    assert parse_args(["--model", "m", "--task", "t", "-i", "in", "-o", "out"]).inference.mirror_axes == (0, 1, 2)
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--task", "t", "-i", "in", "-o", "out", "--overlap", "1.5"])
