"""The bad-input catalogue of predict, evaluate and tune (docs/architecture.md), through each
stage's `main`: the exit status, the one error line (naming the file, store or folder) and that
nothing good was lost (good scans of the batch written, existing outputs and search state kept).

The model and stores are the tiny trained world of test_predict_world.py.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pytest
import yaml

from pipeline.common.config import IngestConfig
from pipeline.common.store import TaskStore
from pipeline.datasets.synthetic import SyntheticTask, write_task
from pipeline.evaluate.__main__ import main as evaluate_main
from pipeline.ingest.run import run as ingest
from pipeline.predict.__main__ import main as predict_main
from pipeline.tune.__main__ import main as tune_main
from test_predict_world import LIVER, World, single_thread, world  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
GOOD = ("synthliver_000", "synthliver_001")


def _scan(world: World, case: str = GOOD[0]) -> Path:
    return world.raw[LIVER.name] / "imagesTr" / f"{case}.nii.gz"


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder nobody may write to: chmod for users; for root (chmod does not stop root), a
    place on sysfs, where not even root can create files."""
    if os.geteuid() == 0:
        return Path("/sys/kernel/uniseg-predict-out")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _predict_argv(world: World, source: Path, output: Path, *extra: str) -> list[str]:
    return ["--model", str(world.model_dir), "--task", LIVER.name, "-i", str(source), "-o", str(output),
            "--tta", "off", *extra]


# --- predict: whole-run bad inputs (exit 2, one line, nothing run) ------------------------


def _two_channels(world: World, folder: Path) -> Path:
    image = nib.load(_scan(world))
    data = np.asarray(image.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), image.affine), folder / "two.nii.gz")
    return folder / "two.nii.gz"


def _volume(shape: tuple[int, ...]) -> Callable[[World, Path], Path]:
    def write(world: World, folder: Path) -> Path:
        path = folder / f"flat_{'x'.join(map(str, shape))}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), nib.load(_scan(world)).affine), path)
        return path

    return write


def _affine(name: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[World, Path], Path]:
    """The good scan with its affine changed, saved as the sform alone (no qform can hold a singular one)."""
    def write(world: World, folder: Path) -> Path:
        image = nib.load(_scan(world))
        header = image.header.copy()
        header.set_sform(change(image.affine), code=1)
        header.set_qform(None, code=0)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), None, header), folder / name)
        return folder / name

    return write


def _truncated(world: World, folder: Path) -> Path:
    (folder / "truncated.nii.gz").write_bytes(_scan(world).read_bytes()[:2000])
    return folder / "truncated.nii.gz"


def _garbage(world: World, folder: Path) -> Path:
    (folder / "garbage.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    return folder / "garbage.nii.gz"


def _named(name: str, content: bytes | None = None) -> Callable[[World, Path], Path]:
    def make(world: World, folder: Path) -> Path:
        path = folder / name
        if content is not None:
            path.write_bytes(content)
        elif name == "empty":
            path.mkdir()
        return path

    return make


def _good(world: World, folder: Path) -> Path:
    return _scan(world)


class Case(NamedTuple):
    """One bad predict input: how to make it, extra options, the message, and its catalogue row
    in docs/architecture.md (tests/test_catalogue.py)."""

    make_input: Callable[[World, Path], Path]
    extra: list[str]
    message: str
    row: str


PREDICT_CATALOGUE = {
    "unknown-task": Case(_good, ["--task", "lungs"], "--task lungs: unknown task 'lungs'; this model knows "
                         "Task01_SynthLiver, Task02_SynthSpleen, Task03_SynthProstate (or 'all')",
                         row="predict-task-or-model"),
    "wrong-channel-count": Case(_two_channels, [], "two.nii.gz: 2 channel(s), but task Task01_SynthLiver needs 1 (CT)",
                                row="predict-channels"),
    "all-without-modality": Case(_good, ["--task", "all"], "--task all picks the tasks by modality: give the scans' "
                                 "channel modalities with --modality", row="predict-all-no-modality"),
    "all-2-channel-ct": Case(_two_channels, ["--task", "all", "--modality", "CT,PET"],
                             "two.nii.gz: no task of this model takes 2 channel(s) of CT, PET; it knows",
                             row="predict-channels"),
    "wrong-modality": Case(_good, ["--modality", "T2"], "modalities T2, but task Task01_SynthLiver needs CT",
                           row="predict-channels"),
    "not-nifti": Case(_named("scan.png", b"\x89PNG"), [], "scan.png: not a NIfTI file (expected .nii or .nii.gz)",
                      row="predict-not-nifti"),
    "garbage-header": Case(_garbage, [], "garbage.nii.gz: not a readable NIfTI file", row="predict-not-nifti"),
    "truncated-data": Case(_truncated, [], "truncated.nii.gz: corrupt NIfTI data", row="predict-corrupt-data"),
    "missing-input": Case(_named("absent.nii.gz"), [], "absent.nii.gz: no such file or folder", row="predict-no-input"),
    "empty-folder": Case(_named("empty"), [], "empty: no NIfTI files (.nii, .nii.gz) in this folder",
                         row="predict-no-input"),
    "1x1x1": Case(_volume((1, 1, 1)), [], "flat_1x1x1.nii.gz: 2D image of shape (1, 1, 1); 3D volumes are required",
                  row="predict-flat-or-affine"),
    "512x512x1": Case(_volume((512, 512, 1)), [],
                      "flat_512x512x1.nii.gz: 2D image of shape (512, 512, 1); 3D volumes are required",
                      row="predict-flat-or-affine"),
    "singular-affine": Case(_affine("flat_axis.nii.gz", lambda a: a @ np.diag([1.0, 1.0, 0.0, 1.0])), [],
                            "flat_axis.nii.gz: singular affine (voxel sizes 1.5, 1.5, 0 mm",
                            row="predict-flat-or-affine"),
    "nan-affine": Case(_affine("nan_affine.nii.gz", lambda a: a * [1, 1, 1, np.nan]), [],  # NaN translation
                       "nan_affine.nii.gz: affine holds NaN or infinite values", row="predict-flat-or-affine"),
    "missing-model": Case(_good, ["--model", "models:/absent@champion"], "models:/absent@champion: model not found",
                          row="predict-task-or-model"),
}


@pytest.mark.parametrize("kind", list(PREDICT_CATALOGUE))
def test_predict_bad_input(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    make_input, extra, message, _ = PREDICT_CATALOGUE[kind]
    source = make_input(world, tmp_path)
    output = tmp_path / "out"
    assert predict_main(_predict_argv(world, source, output, *extra)) == 2
    (error,) = _errors(caplog)
    assert message in error and "\n" not in error
    assert not output.exists() or not any(output.iterdir())


@pytest.mark.catalogue("output-unwritable")
def test_predict_read_only_output_fails_before_inference(world: World, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.predict.run

    def no_inference(*args: object) -> None:
        raise AssertionError("inference started before the output folder was checked")

    monkeypatch.setattr(pipeline.predict.run, "attempt_job", no_inference)
    output = _read_only_folder(tmp_path)
    assert predict_main(_predict_argv(world, _scan(world), output)) == 2
    (error,) = _errors(caplog)
    assert error.startswith(f"{output}: output folder is not writable (") and "\n" not in error


@pytest.mark.catalogue("predict-output-exists")
def test_predict_existing_output_is_kept(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / f"{GOOD[0]}.nii.gz").write_bytes(b"an earlier result")
    assert predict_main(_predict_argv(world, _scan(world), output)) == 2
    (error,) = _errors(caplog)
    assert f"{GOOD[0]}.nii.gz: output already exists; pass --overwrite to replace" in error
    assert (output / f"{GOOD[0]}.nii.gz").read_bytes() == b"an earlier result"
    assert sorted(p.name for p in output.iterdir()) == [f"{GOOD[0]}.nii.gz"]


# --- predict: one bad scan in a batch fails alone ---------------------------------------------


def _batch(world: World, folder: Path) -> Path:
    folder.mkdir()
    for case in GOOD:
        (folder / f"{case}.nii.gz").symlink_to(_scan(world, case))
    return folder


def _assert_good_outputs(world: World, output: Path) -> None:
    for case in GOOD:
        labels = nib.load(output / f"{case}.nii.gz")
        assert labels.shape == nib.load(_scan(world, case)).shape and np.asarray(labels.dataobj).any()
        assert (output / f"{case}.json").is_file()
    assert not [p for p in output.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.catalogue("predict-corrupt-data")
def test_a_truncated_scan_sorted_first_fails_alone(world: World, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    inputs = _batch(world, tmp_path / "in")
    (inputs / "a_truncated.nii.gz").write_bytes(_scan(world).read_bytes()[:2000])
    _garbage(world, inputs)  # a header nibabel cannot read: set aside before inference
    output = tmp_path / "out"
    assert predict_main(_predict_argv(world, inputs, output)) == 2
    errors = _errors(caplog)
    assert len(errors) == 3 and all("\n" not in e for e in errors)
    assert "garbage.nii.gz: not a readable NIfTI file" in errors[0]
    assert "a_truncated.nii.gz: corrupt NIfTI data" in errors[1]
    assert errors[2] == (f"{output}: 2 of 4 scan(s) predicted; 2 failed (garbage.nii.gz, a_truncated.nii.gz; "
                         "each logged above)")
    _assert_good_outputs(world, output)
    assert not (output / "a_truncated.nii.gz").exists() and not (output / "a_truncated.json").exists()


@pytest.mark.slow
def test_a_truncated_scan_fails_alone_on_ray(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import ray

    inputs = _batch(world, tmp_path / "in")
    (inputs / "a_truncated.nii.gz").write_bytes(_scan(world).read_bytes()[:2000])
    output = tmp_path / "out"
    try:
        status = predict_main(_predict_argv(world, inputs, output, "--ray", "--num-workers", "1"))
    finally:
        ray.shutdown()
    assert status == 2
    assert "a_truncated.nii.gz: corrupt NIfTI data" in caplog.text
    assert _errors(caplog)[-1] == (f"{output}: 2 of 3 scan(s) predicted; 1 failed (a_truncated.nii.gz; "
                                   "each logged above)")
    _assert_good_outputs(world, output)


@pytest.mark.catalogue("predict-case-id-twice")
def test_duplicate_case_ids_fail_alone(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inputs = _batch(world, tmp_path / "in")
    shutil.copy(_scan(world, "synthliver_002"), inputs / "twice.nii.gz")
    nib.save(nib.load(_scan(world, "synthliver_002")), inputs / "twice.nii")
    output = tmp_path / "out"
    assert predict_main(_predict_argv(world, inputs, output)) == 2
    errors = _errors(caplog)
    assert sum("another input has the same case id 'twice'" in e for e in errors) == 2
    assert "2 of 4 scan(s) predicted" in errors[-1]
    _assert_good_outputs(world, output)
    assert not (output / "twice.nii.gz").exists()


@pytest.mark.catalogue("predict-other-failure")
def test_a_scan_failing_for_another_reason_fails_alone_with_status_1(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.predict.job

    real = pipeline.predict.job.predict_scan
    calls = []

    def out_of_memory_once(*args: object, **kwargs: object) -> object:  # a fault from outside the code
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.predict.job, "predict_scan", out_of_memory_once)
    inputs = _batch(world, tmp_path / "in")
    (inputs / "a_first.nii.gz").symlink_to(_scan(world, "synthliver_002"))
    output = tmp_path / "out"
    assert predict_main(_predict_argv(world, inputs, output)) == 1
    assert "a_first.nii.gz: prediction failed (RuntimeError: CUDA out of memory (simulated))" in caplog.text
    assert _errors(caplog)[-1] == f"{output}: 2 of 3 scan(s) predicted; 1 failed (a_first.nii.gz; each logged above)"
    _assert_good_outputs(world, output)


# --- evaluate ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_channel_prostate(world: World, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store named like the model's 2-channel (T2, ADC) prostate task, holding 1 channel (T2)."""
    root = tmp_path_factory.mktemp("prostate-1ch")
    task = SyntheticTask("Task03_SynthProstate", ("T2",), ("background", "peripheral zone", "transition zone"),
                         spacing=(2.5, 2.5, 3.6), shape=(16, 16, 16), num_cases=4)
    report = ingest([str(write_task(root / "raw", task))], str(root / "stores"),
                    IngestConfig(scheduler="synchronous", folds=2))
    assert report.ok
    return str(root / "stores" / "Task03_SynthProstate.zarr")


def _evaluate_argv(world: World, store: str, output: Path) -> list[str]:
    return ["--model", str(world.model_dir), "--store", store, "-o", str(output), "--tta", "off", "--no-mlflow",
            "--space", "store"]


@pytest.mark.catalogue("evaluate-channels")
def test_evaluate_channel_mismatch_names_the_store(world: World, one_channel_prostate: str, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    output = tmp_path / "eval"
    assert evaluate_main(_evaluate_argv(world, one_channel_prostate, output)) == 2
    (error,) = _errors(caplog)
    assert error == (f"{one_channel_prostate}: 1 channel(s) (T2), but the model's task Task03_SynthProstate "
                     "takes 2 (T2, ADC)")
    assert not output.exists()


@pytest.mark.catalogue("output-unwritable")
def test_evaluate_read_only_output_fails_before_inference(world: World, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.evaluate.run

    def no_inference(*args: object, **kwargs: object) -> None:
        raise AssertionError("evaluation started before the output folder was checked")

    monkeypatch.setattr(pipeline.evaluate.run, "evaluate_case", no_inference)
    output = _read_only_folder(tmp_path)
    assert evaluate_main(_evaluate_argv(world, world.stores[LIVER.name], output)) == 2
    (error,) = _errors(caplog)
    assert error.startswith(f"{output}: output folder is not writable (")


@pytest.mark.catalogue("evaluate-corrupt-chunk")
def test_evaluate_corrupt_chunk_names_store_case_and_array(world: World, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "corrupt.zarr"
    shutil.copytree(world.stores[LIVER.name], store)
    case = TaskStore.open(str(store)).case_ids("validation")[0]
    shard = next(p for p in (store / "cases" / case / "image").rglob("*") if p.is_file() and "c" in p.parts)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, inside a chunk (the shard index comes first)
    shard.write_bytes(bytes(data))
    assert evaluate_main(_evaluate_argv(world, str(store), tmp_path / "eval")) == 2
    (error,) = _errors(caplog)
    assert str(store) in error and case in error and "image" in error and "\n" not in error


@pytest.mark.catalogue("evaluate-store")
def test_evaluate_missing_store(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert evaluate_main(_evaluate_argv(world, str(tmp_path / "absent.zarr"), tmp_path / "eval")) == 2
    (error,) = _errors(caplog)
    assert "absent.zarr" in error and "\n" not in error


# --- tune ---------------------------------------------------------------------------------------


class _Marker:
    """Unpickling this creates a file: proof that a search's saved state was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def _tune_config(world: World, tmp_path: Path) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "tune-tiny.yaml").read_text())
    raw["name"] = "search"
    raw["data"]["stores"] = [world.stores[LIVER.name]]
    raw["ray"].update(storage_path=str(tmp_path / "ray"), address="local")
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw["tune"]["best_config"] = str(tmp_path / "best.yaml")
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.catalogue("tune-exists")
def test_tune_never_resumes_unasked(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    search = tmp_path / "ray" / "search"
    search.mkdir(parents=True)
    marker = tmp_path / "unpickled"
    state = pickle.dumps(_Marker(marker))
    (search / "tuner.pkl").write_bytes(state)
    assert tune_main(["--config", str(_tune_config(world, tmp_path))]) == 2
    (error,) = _errors(caplog)
    assert error.startswith(f"{search}: search 'search' already exists; continue it with --resume")
    assert not marker.exists(), "the search state was unpickled without --resume"
    assert (search / "tuner.pkl").read_bytes() == state and sorted(os.listdir(search)) == ["tuner.pkl"]


@pytest.mark.catalogue("tune-nothing")
def test_tune_resume_needs_a_search(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert tune_main(["--config", str(_tune_config(world, tmp_path)), "--resume"]) == 2
    (error,) = _errors(caplog)
    assert error == f"{tmp_path / 'ray' / 'search'}: no search 'search' to resume"
