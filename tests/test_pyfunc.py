"""The logged pyfunc model: self-contained (code, pinned requirements, signature, input example)
and its predict interface (pipeline/common/pyfunc_io.py); serving over HTTP is tests/test_serve.py."""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Iterator
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from model.presets import PRESETS
from pipeline.common.geometry import nifti_channels
from pipeline.common.inference import InferenceOptions, predict_scan
from pipeline.common.mlflow_model import PYFUNC_DISTRIBUTIONS, log_model, pyfunc_requirements
from pipeline.common.model_card import ModelCard, TaskCard, build_from_card
from pipeline.common.nifti import from_bytes, to_bytes

CT = TaskCard("liver", {0: "background", 1: "liver", 2: "tumour"}, ("CT",), (2.0, 1.0, 1.0),
              ({"scheme": "ct-window", "lower": -325.0, "upper": 325.0},))
MR = TaskCard("prostate", {0: "background", 1: "zone"}, ("T2", "ADC"), (3.0, 1.0, 1.0), ({"scheme": "zscore"},) * 2)
CARD = ModelCard(PRESETS["tiny"].replace(patch_size=(16, 32, 32)), (CT, MR))


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, torch.nn.Module, Path]]:
    root = tmp_path_factory.mktemp("pyfunc")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    torch.manual_seed(0)
    network = build_from_card(CARD).eval()
    experiment = mlflow.create_experiment("pyfunc", artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_model(network, CARD, registered_model_name="pyfunc-test")
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(root / "download")))
    yield info.model_uri, network, local
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def pyfunc(logged: tuple[str, torch.nn.Module, Path]) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(logged[0])


def _scan(shape: tuple[int, ...] = (30, 24, 12), seed: int = 1) -> nib.Nifti1Image:
    affine = np.array([[0, -1.2, 0, 10], [0.9, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]], dtype=float)  # PLS-ish
    data = np.random.default_rng(seed).normal(0, 200, size=shape).astype(np.float32)
    return nib.Nifti1Image(data, affine)


def test_model_carries_its_code_and_pinned_requirements(logged: tuple[str, torch.nn.Module, Path]) -> None:
    _, _, local = logged
    code = local / "code"
    assert (code / "pipeline" / "common" / "pyfunc_io.py").is_file() and (code / "model" / "universal.py").is_file()
    assert not list(code.rglob("__pycache__"))
    requirements = (local / "requirements.txt").read_text().split()
    assert requirements == pyfunc_requirements()
    assert all("==" in r for r in requirements)
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert f"mlflow=={importlib.metadata.version('mlflow')}" in requirements
    assert len(requirements) == len(PYFUNC_DISTRIBUTIONS)
    meta = mlflow.models.Model.load(str(local))
    assert [c.name for c in meta.signature.inputs.inputs] == ["task", "image", "path", "array"]
    assert {p.name for p in meta.signature.params.params} == {"tta", "overlap"}
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["task", "image"] and example["params"] == {"tta": False}


def test_bytes_and_path_give_the_label_map_on_the_scans_grid(logged: tuple[str, torch.nn.Module, Path],
                                                            pyfunc: mlflow.pyfunc.PyFuncModel, tmp_path: Path) -> None:
    network = logged[1]
    scan = _scan()
    nib.save(scan, tmp_path / "scan.nii.gz")
    rows = pyfunc.predict([{"task": "liver", "image": to_bytes(scan)},
                          {"task": "liver", "path": str(tmp_path / "scan.nii.gz")},
                          {"task": "liver", "image": (tmp_path / "scan.nii.gz").read_bytes()}]).to_dict("records")
    raw, affine = nifti_channels([scan])
    expected = predict_scan(network, CARD, 0, raw, affine, InferenceOptions()).labels
    for row in rows:
        labels = from_bytes(row["labels"])
        assert labels.shape == scan.shape and labels.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(labels.dataobj), expected)
        np.testing.assert_allclose(labels.affine, scan.affine)
        np.testing.assert_allclose(np.array(row["affine"]), scan.affine)
        assert row["task"] == "liver" and json.loads(row["classes"]) == {"0": "background", "1": "liver", "2": "tumour"}


def test_two_channel_task_and_tta_param(logged: tuple[str, torch.nn.Module, Path],
                                       pyfunc: mlflow.pyfunc.PyFuncModel) -> None:
    network = logged[1]
    scan = _scan((20, 18, 8, 2))
    (row,) = pyfunc.predict({"task": "prostate", "image": to_bytes(scan)}, params={"tta": True}).to_dict("records")
    raw, affine = nifti_channels([scan])
    expected = predict_scan(network, CARD, 1, raw, affine, InferenceOptions(mirror_axes=(0, 1, 2))).labels
    np.testing.assert_array_equal(np.asarray(from_bytes(row["labels"]).dataobj), expected)


@pytest.mark.parametrize(("row", "message"), [
    ({"task": "lung", "path": "x.nii.gz"}, "row 0: unknown task 'lung'; this model knows liver, prostate"),
    ({"task": "liver"}, "row 0: give exactly one of image (NIfTI bytes), path, array; got none"),
    ({"task": "liver", "path": "a.nii", "image": b"x"}, "got image and path"),
    ({"task": "liver", "image": b"not a nifti"}, "row 0: image: not a readable NIfTI file"),
    ({"task": "liver", "path": "/absent.nii.gz"}, "row 0: /absent.nii.gz: not a readable NIfTI file"),
    ({"task": "prostate", "image": to_bytes(_scan())}, "row 0: the scan has 1 channel(s), task prostate takes 2 (T2, ADC)"),
    ({"task": "liver", "image": to_bytes(_scan((30, 24, 1)))}, "row 0: 2D image of shape (30, 24, 1)"),
])
def test_bad_rows_name_the_row_and_the_problem(pyfunc: mlflow.pyfunc.PyFuncModel, row: dict, message: str) -> None:
    with pytest.raises(MlflowException, match=re.escape(message)):
        pyfunc.predict([row])
