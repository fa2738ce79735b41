"""Done-when test of cross-validation: a small synthetic set with labelsTs is ingested into 3
folds; 3-fold cross-validation of the tiny model runs with the folds in parallel on a local Ray
(one fold loses a worker and is retried from its checkpoint); the fold ensemble is registered,
predicts the test scans, and folder evaluation scores them against labelsTs, checked against
Dice computed by hand (and, on a built pair, the empty-reference rule)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from pipeline.common.config import IngestConfig, load_config
from pipeline.common.inference import InferenceOptions
from pipeline.common.mlflow_model import load_model
from pipeline.common.store import TaskStore
from pipeline.common.services import connect_ray
from pipeline.datasets.synthetic import SyntheticTask, write_task
from pipeline.evaluate.folder import score_folder
from pipeline.evaluate.run import EvaluateOptions
from pipeline.evaluate.run import run as evaluate
from pipeline.ingest.run import run as ingest
from pipeline.predict.run import PredictOptions
from pipeline.predict.run import run as predict
from pipeline.train.cv_summary import OutOfFoldRow, markdown, summarise
from pipeline.train.folds import FOLD_TAG, fold_config, run_cv
from pipeline.train.loop import RunContext
from pipeline.train.run import concurrent_runs
from test_ingest_split import write_test_labels

TASK = SyntheticTask("Task05_CvLiver", ("CT",), ("background", "liver", "tumour"), spacing=(1.5, 1.5, 4.0),
                     shape=(32, 32, 16), num_cases=6, num_test_cases=2)
FAST = InferenceOptions(mirror_axes=(), amp=False)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    connect_ray(None, "127.0.0.1")
    yield
    ray.shutdown()


def _config(root: Path, store: str, tracking_uri: str | None = None) -> Path:
    """`tracking_uri` None: the default store, `mlflow.db` in the working directory."""
    raw = {
        "name": "cv",
        "data": {"stores": [store]},
        "model": {"preset": "tiny", "patch_size": [16, 32, 32]},
        "train": {"epochs": 2, "iterations_per_epoch": 4, "batch_size": 2, "validate_every": 2,
                  "checkpoint_every": 1, "loader_workers": 0, "precision": "fp32", "log_every": 4},
        # 3 folds x 1 worker x 0.5 CPU: all three fit at once on 2 cores
        "ray": {"num_workers": 1, "cpus_per_worker": 0.5, "storage_path": str(root / "ray"), "max_failures": 1},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "cv-tests", "registered_model": "cv-ensemble"},
    }
    path = root / "cv.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _dice_by_hand(prediction: np.ndarray, reference: np.ndarray, label: int) -> float:
    """2|P & R| / (|P| + |R|); NaN when both are empty, 0 when only the reference is (nnU-Net)."""
    p, r = prediction == label, reference == label
    if not r.any() and not p.any():
        return math.nan
    return 2 * np.logical_and(p, r).sum() / (p.sum() + r.sum())


def _add_built_pair(pred: Path, ref: Path) -> None:
    """A built case: liver a 3x3x3 cube, predicted shifted by one slice (18 of 27 voxels shared,
    Dice 2/3); no tumour in the reference, 2 tumour voxels predicted (Dice 0 by nnU-Net's rule)."""
    reference, prediction = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    reference[2:5, 2:5, 2:5] = 1
    prediction[3:6, 2:5, 2:5] = 1
    prediction[7, 7, 0:2] = 2
    nib.save(nib.Nifti1Image(reference, np.eye(4)), ref / "built.nii.gz")
    nib.save(nib.Nifti1Image(prediction, np.eye(4)), pred / "built.nii.gz")


def test_summary_known_answers() -> None:
    """Fold 0 held out a (0.8) and b (0.6, tumour absent from both: NaN); fold 1 held out c (0.4,
    tumour 0.5); fold 2 held out nothing of this task."""
    nan = math.nan
    rows = [OutOfFoldRow(0, "liver", "a", 1, "organ", 0.8, 1, 2), OutOfFoldRow(0, "liver", "a", 2, "tumour", 1.0, 0, 0),
            OutOfFoldRow(0, "liver", "b", 1, "organ", 0.6, 3, 1), OutOfFoldRow(0, "liver", "b", 2, "tumour", nan, 0, 0),
            OutOfFoldRow(1, "liver", "c", 1, "organ", 0.4, 5, 5), OutOfFoldRow(1, "liver", "c", 2, "tumour", 0.5, 1, 1)]
    organ, tumour, mean = summarise(rows, [0, 1, 2])
    assert organ.fold_dice[:2] == pytest.approx((0.7, 0.4)) and math.isnan(organ.fold_dice[2])
    assert (organ.mean, organ.std) == (pytest.approx(0.55), pytest.approx(np.std([0.7, 0.4], ddof=1)))
    assert organ.pooled == pytest.approx(0.6) and organ.cases == 3
    assert tumour.fold_dice[:2] == (1.0, 0.5) and tumour.pooled == 0.75 and tumour.cases == 2
    assert mean.class_id is None and mean.fold_dice[:2] == pytest.approx((0.85, 0.45))
    assert mean.pooled == pytest.approx((0.6 + 0.75) / 2)
    table = markdown([organ, tumour, mean], [0, 1, 2], "CV", ["fold 1 failed 1 time(s)"])
    assert "| liver | 1 organ | 0.7000 | 0.4000 | - | 0.5500 | 0.2121 | 0.6000 | 3 |" in table
    assert table.endswith("- fold 1 failed 1 time(s)\n")


def test_fold_config_validates_on_its_fold_and_leaves_retries_to_tune(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    store.mkdir()
    cfg = load_config(_config(tmp_path, str(store), f"sqlite:///{tmp_path / 'mlflow.db'}"))
    fold = fold_config(cfg, 2)
    assert (fold.name, fold.data.fold, fold.ray.max_failures, fold.mlflow.registered_model) == ("cv-fold2", 2, 0, None)
    assert fold.train == cfg.train and fold.model == cfg.model


def test_folds_start_as_many_at_once_as_a_local_ray_holds(tmp_path: Path, local_ray: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = int(ray.cluster_resources()["CPU"])
    (tmp_path / "s.zarr").mkdir()
    cfg = load_config(_config(tmp_path, str(tmp_path / "s.zarr")))
    assert concurrent_runs(cfg, 9) == min(9, 2 * cpus)  # one worker of 0.5 CPU per fold
    assert concurrent_runs(cfg, 1) == 1
    greedy = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, cpus_per_worker=float(cpus + 1)))
    assert concurrent_runs(greedy, 9) == 1  # never none: that one waits for its workers
    with_driver = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, trial_cpus=0.5))
    assert concurrent_runs(with_driver, 9) == min(9, cpus)  # the trial's driver CPU counts too
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a joined cluster: its autoscaler adds nodes
    assert concurrent_runs(cfg, 9) == 9


@pytest.mark.slow
def test_cross_validation_ensemble_predict_and_folder_evaluation(tmp_path: Path, local_ray: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The default store (issue 22): three folds' processes write to ./mlflow.db at once.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tracking_uri = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    raw = write_task(tmp_path / "raw", TASK)
    write_test_labels(raw, TASK)
    report = ingest([raw], str(tmp_path / "stores"), IngestConfig(folds=3, scheduler="synchronous"))
    assert report.ok
    store_uri = report.datasets[0].store
    store = TaskStore.open(store_uri)
    assert [len(f) for f in store.manifest.folds] == [2, 2, 2] and len(store.case_ids("test")) == 2

    cfg = load_config(_config(tmp_path, store_uri))
    fault = RunContext(fail_epoch=1, fail_rank=0, fail_marker=str(tmp_path / "fold1-killed"))
    result = run_cv(cfg, folds=None, fold_context={1: fault})

    # Every fold finished; fold 1 lost its worker once and went on from its checkpoint.
    assert (tmp_path / "fold1-killed").exists()
    assert [(o.fold, o.status, o.attempts) for o in result.folds] == [(0, "finished", 1), (1, "finished", 2),
                                                                     (2, "finished", 1)]
    assert cfg.mlflow.tracking_uri is None
    client = MlflowClient(tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["cv.fold1.attempts"] == "2"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    by_fold = {int(c.data.tags[FOLD_TAG]): c for c in children}
    assert sorted(by_fold) == [0, 1, 2] and all(c.info.status == "FINISHED" for c in children)
    assert {k: c.data.params["data.fold"] for k, c in by_fold.items()} == {0: "0", 1: "1", 2: "2"}
    # The folds ran at the same time, sharing the cluster.
    assert max(c.info.start_time for c in children) < min(c.info.end_time for c in children)
    # Every epoch of every fold is logged, once (fold 1's too, although it ran twice), and the
    # validation of its last epoch.
    for fold, child in by_fold.items():
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == [0, 1], fold
        assert [m.step for m in client.get_metric_history(child.info.run_id, "dice/mean")] == [1], fold

    # Each fold validated on its own held-out cases: together, every labelled case once.
    liver = next(r for r in result.summary if r.name == "liver")
    per_fold = []
    pooled = []
    for fold in range(3):
        fold_rows = json.loads(Path(result.run_dir, "folds", f"cv-fold{fold}", "out_of_fold.json").read_text())
        assert sorted({r["case"] for r in fold_rows}) == store.manifest.folds[fold]
        values = [r["dice"] for r in fold_rows if r["name"] == "liver"]
        per_fold.append(np.mean(values))
        pooled += values
    assert liver.fold_dice == pytest.approx(tuple(per_fold))
    assert (liver.mean, liver.std) == (pytest.approx(np.mean(per_fold)), pytest.approx(np.std(per_fold, ddof=1)))
    assert liver.pooled == pytest.approx(np.mean(pooled)) and liver.cases == 6
    assert parent.data.metrics["cv/Task05_CvLiver/liver/dice_pooled"] == pytest.approx(liver.pooled)
    summary_md = Path(result.run_dir, "cross_validation", "cv_summary.md").read_text()
    assert "| Task05_CvLiver | 1 liver |" in summary_md and "fold 1 failed 1 time(s)" in summary_md
    assert Path(result.run_dir, "cross_validation", "cv_summary.png").read_bytes()[:4] == b"\x89PNG"
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "cross_validation")}
    assert {"cross_validation/cv_summary.png", "cross_validation/cv_summary.md"} <= artifacts

    # The registered model is the ensemble of the three folds.
    assert result.model_uri == "models:/cv-ensemble/1"
    mlflow.set_tracking_uri(tracking_uri)
    _, card = load_model(result.model_uri)
    task_mean = next(r for r in result.summary if r.class_id is None)
    assert card.folds == (0, 1, 2) and card.metadata["cross_validation"]["dice_pooled"] == pytest.approx(task_mean.pooled)

    # The ensemble predicts the test scans; folder evaluation scores them against labelsTs.
    out = tmp_path / "predictions"
    predict(PredictOptions(model=result.model_uri, task=TASK.name, input=raw / "imagesTs", output=out,
                           inference=FAST, tracking_uri=tracking_uri))
    _add_built_pair(out, raw / "labelsTs")
    scored = score_folder(out, raw / "labelsTs", raw / "dataset.json")
    assert {r.case for r in scored} == {"cvliver_006", "cvliver_007", "built"}
    for row in scored:
        if row.case == "built":
            continue
        prediction = np.asarray(nib.load(out / f"{row.case}.nii.gz").dataobj)
        reference = np.asarray(nib.load(raw / "labelsTs" / f"{row.case}.nii.gz").dataobj)
        expected = _dice_by_hand(prediction, reference, row.metrics.class_id)
        assert row.metrics.dice == pytest.approx(expected, nan_ok=True)
    built = {r.metrics.name: r.metrics for r in scored if r.case == "built"}
    assert built["liver"].dice == pytest.approx(2 / 3) and built["tumour"].dice == 0.0
    assert built["tumour"].false_positives == 2
    # evaluate --split test scores the same test cases through the store, with the same figures.
    (raw / "labelsTs" / "built.nii.gz").unlink()
    test_split = evaluate(EvaluateOptions(model=result.model_uri, stores=(store_uri,), output=tmp_path / "eval",
                                          split="test", inference=FAST, log_to_mlflow=False))
    folder = {(r.case, r.metrics.class_id): r.metrics.dice for r in scored if r.case != "built"}
    assert {(r.case, r.metrics.class_id): r.metrics.dice for r in test_split.rows} == pytest.approx(folder, nan_ok=True)
