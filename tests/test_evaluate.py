"""`pipeline.evaluate`: the report from hand-made metrics, and runs on the tiny model's stores."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.common.inference import InferenceOptions
from pipeline.common.metrics import ClassMetrics
from pipeline.evaluate.__main__ import parse_args
from pipeline.evaluate.cases import EvaluateError
from pipeline.evaluate.report import CaseRow, markdown, mlflow_metrics, summarize, write_report
from pipeline.evaluate.run import EvaluateOptions, run
from pipeline.evaluate.slices import pick_slice, write_slices
from pipeline.common.mlflow_model import model_run
from test_predict_world import LIVER, SPLEEN, World, build_world, one_thread

FAST = InferenceOptions(mirror_axes=())
NAN = math.nan
ROWS = [
    CaseRow("liver", "a", ClassMetrics(1, "liver", 0.9, 2.0, 100, 110, 16, 6)),
    CaseRow("liver", "a", ClassMetrics(2, "tumour", 0.5, 4.0, 10, 12, 7, 5)),
    CaseRow("liver", "b", ClassMetrics(1, "liver", 0.7, 6.0, 90, 80, 20, 30)),
    CaseRow("liver", "b", ClassMetrics(2, "tumour", NAN, NAN, 0, 3, 3, 0)),  # no tumour in b: not scored (MONAI rule)
    CaseRow("spleen", "c", ClassMetrics(1, "spleen", 0.6, 1.0, 50, 40, 13, 23)),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.getbasetemp() / "predict-world")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def test_summary_skips_undefined_values() -> None:
    liver, tumour, liver_mean, spleen, spleen_mean = summarize(ROWS)
    assert (liver.cases, liver.dice_mean, liver.dice_std) == (2, pytest.approx(0.8), pytest.approx(0.1))
    assert liver.hd95_mean == 4.0
    assert (tumour.cases, tumour.dice_mean, tumour.hd95_median) == (1, 0.5, 4.0)
    assert liver_mean.class_id is None and liver_mean.dice_mean == pytest.approx(0.65)
    assert spleen.dice_mean == spleen_mean.dice_mean == 0.6


def test_markdown_and_mlflow_metrics() -> None:
    summaries = summarize(ROWS)
    table = markdown(summaries, "Evaluation")
    assert "| liver | 2 tumour | 1 | 0.5000 | 0.0000 | 4.00 | 4.00 |" in table
    assert "| liver | **mean** | 2 | 0.6500 | - |" in table
    assert "Mean Dice over tasks: 0.6250" in table
    metrics = mlflow_metrics(summaries, "validation")
    assert metrics["eval/validation/dice"] == pytest.approx(0.625)
    assert metrics["eval/validation/liver/tumour/hd95"] == 4.0 and metrics["eval/validation/spleen/dice"] == 0.6


def test_report_files(tmp_path: Path) -> None:
    _, files = write_report(ROWS, tmp_path / "report", "Evaluation")
    assert [f.name for f in files] == ["metrics.csv", "summary.md", "summary.json", "boxplot_liver.png",
                                       "boxplot_spleen.png"]
    with files[0].open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["task", "case", "class_id", "name", "dice", "hd95", "reference_voxels", "predicted_voxels",
                             "false_positives", "false_negatives"]
    assert len(rows) == 5 and rows[3]["dice"] == "nan"
    assert files[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(files[2].read_text())
    assert summary["metric_per_case"][1] == {"task": "liver", "case": "b", "metrics": {
        "liver/1": {"Dice": 0.7, "HD95": 6.0, "FP": 20, "FN": 30, "n_pred": 80, "n_ref": 90},
        "liver/2": {"Dice": None, "HD95": None, "FP": 3, "FN": 0, "n_pred": 3, "n_ref": 0}}}
    assert summary["mean"]["liver/1"]["Dice"] == pytest.approx(0.8) and summary["mean"]["liver/2"]["FP"] == 5
    assert summary["foreground_mean"]["Dice"] == pytest.approx((0.8 + 0.5 + 0.6) / 3)


def test_model_run_of_uri_forms(world: World) -> None:
    run = model_run(world.model_uri, world.tracking_uri)
    assert run is not None and model_run("models:/tiny-uniseg/1", world.tracking_uri) == run
    assert model_run(f"runs:/{run.run_id}/model", world.tracking_uri) == run
    assert model_run(str(world.model_dir), world.tracking_uri) is None


def test_store_space_on_two_stores(world: World, tmp_path: Path) -> None:
    options = EvaluateOptions(model=str(world.model_dir), stores=(world.stores[LIVER.name], world.stores[SPLEEN.name]),
                              output=tmp_path, space="store", inference=FAST)
    result = run(options)
    assert {(r.task, r.case) for r in result.rows} == {
        (LIVER.name, "synthliver_002"), (LIVER.name, "synthliver_004"), (SPLEEN.name, "synthspleen_002")}
    assert result.run_id is None  # a model folder has no run
    assert result.metrics[f"eval/validation/{LIVER.name}/liver/dice"] > 0.7
    assert result.metrics[f"eval/validation/{SPLEEN.name}/dice"] > 0.7
    assert (tmp_path / "summary.md").is_file() and (tmp_path / f"boxplot_{SPLEEN.name}.png").is_file()
    assert {tmp_path / f"slices_{t.name}.png" for t in (LIVER, SPLEEN)} <= set(result.files)


def test_raw_root_finds_moved_source_labels(world: World, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(world.raw[LIVER.name], moved / LIVER.name)
    options = EvaluateOptions(model=str(world.model_dir), stores=(world.stores[LIVER.name],), output=tmp_path / "a",
                              inference=FAST, raw_root=moved)
    original = run(replace(options, raw_root=None, output=tmp_path / "b"))
    assert [r.metrics for r in run(options).rows] == [r.metrics for r in original.rows]
    with pytest.raises(EvaluateError, match="source label of case synthliver_002 not found"):
        run(replace(options, raw_root=tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(split="test"), "case synthliver_005 has no ground truth"),
        (dict(stores=("absent.zarr",)), "absent.zarr: not a Zarr group"),
        (dict(model="models:/absent/3"), "models:/absent/3: model not found"),
    ],
    ids=["test-split-without-labels", "missing-store", "missing-model"],
)
def test_errors(world: World, tmp_path: Path, changes: dict, message: str) -> None:
    options = EvaluateOptions(**{"model": str(world.model_dir), "stores": (world.stores[LIVER.name],),
                                 "output": tmp_path, "inference": FAST, "tracking_uri": world.tracking_uri} | changes)
    with pytest.raises(EvaluateError, match=message):
        run(options)


def test_cli_options() -> None:
    options = parse_args(["--model", "m", "--store", "a.zarr", "--store", "b.zarr", "--tta", "off", "--no-mlflow"])
    assert options.stores == ("a.zarr", "b.zarr") and options.split == "val" and options.space == "original"
    assert options.inference.mirror_axes == () and not options.log_to_mlflow


def test_example_slice_is_the_one_with_most_reference_foreground(tmp_path: Path) -> None:
    image = np.random.default_rng(0).normal(size=(2, 5, 8, 8)).astype(np.float32)
    reference = np.zeros((5, 8, 8), np.uint8)
    reference[1, :2, :2] = 1
    reference[3, 2:6, 2:6] = 2  # the most foreground
    prediction = np.roll(reference, 1, axis=2)
    example = pick_slice("case_a", image, reference, prediction)
    assert example.z == 3
    np.testing.assert_array_equal(example.image, image[0, 3])
    np.testing.assert_array_equal(example.prediction, prediction[3])
    assert pick_slice("empty", image, np.zeros_like(reference), prediction).z == 2  # middle when no foreground
    (path,) = write_slices({"Task 1": [example, example]}, {"Task 1": {0: "bg", 1: "a", 2: "b"}}, tmp_path)
    assert path.name == "slices_Task_1.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
