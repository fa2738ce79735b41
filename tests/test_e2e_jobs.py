"""The user's path on a real cluster: ingest, train and evaluate submitted with `ray job submit`
to a Ray head started here, then `pipeline.predict` from the MLflow registry on a raw NIfTI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.datasets.synthetic import DEFAULT_TASKS, write_task
from ray_head import ray_head

ROOT = Path(__file__).resolve().parents[1]
MODEL = "uniseg-e2e"


def _job(head, entrypoint: list[str]) -> str:
    job = head.submit(["python", "-m", *entrypoint], cwd=ROOT)
    output = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in output, output[-4000:]
    return output


def _config(work: Path, stores: list[str], tracking_uri: str) -> Path:
    config = {
        "name": "e2e",
        "data": {"stores": stores},
        "model": {"preset": "tiny", "patch_size": [16, 32, 32]},
        "train": {"epochs": 2, "iterations_per_epoch": 4, "validate_every": 2, "checkpoint_every": 1,
                  "loader_workers": 0, "precision": "fp32"},
        "ray": {"num_workers": 2, "cpus_per_worker": 1, "storage_path": str(work / "ray")},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "e2e", "registered_model": MODEL},
    }
    path = work / "e2e.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_ingest_train_evaluate_as_ray_jobs_then_predict_from_the_registry(tmp_path: Path) -> None:
    tasks = [dataclasses.replace(t, num_cases=4, num_test_cases=1) for t in (DEFAULT_TASKS[0], DEFAULT_TASKS[2])]
    sources = [write_task(tmp_path / "raw", task) for task in tasks]
    stores = [str(tmp_path / "stores" / f"{t.name}.zarr") for t in tasks]
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with ray_head() as head:
        ingest = ["pipeline.ingest", "--out", str(tmp_path / "stores")]
        for source in sources:
            ingest += ["--source", str(source)]
        _job(head, ingest)
        _job(head, ["pipeline.train", "--config", str(_config(tmp_path, stores, tracking_uri))])
        evaluate = ["pipeline.evaluate", "--model", f"models:/{MODEL}/1", "--tracking-uri", tracking_uri,
                    "--tta", "off", "-o", str(tmp_path / "evaluate")]
        for store in stores:
            evaluate += ["--store", store]
        _job(head, evaluate)

    client = MlflowClient(tracking_uri)
    version = client.get_model_version(MODEL, "1")
    metrics = client.get_run(version.run_id).data.metrics
    for task in tasks:
        assert 0 <= metrics[f"dice/{task.name}/mean"] <= 1
    assert (tmp_path / "evaluate" / "summary.md").is_file()

    client.set_registered_model_alias(MODEL, "e2e", "1")
    scan = next((tmp_path / "raw" / tasks[0].name / "imagesTs").glob("*.nii.gz"))
    predicted = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", "--model", f"models:/{MODEL}@e2e", "--tracking-uri", tracking_uri,
         "--task", tasks[0].name, "-i", str(scan), "-o", str(tmp_path / "predictions"), "--tta", "off"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    labels = nib.load(tmp_path / "predictions" / scan.name)
    image = nib.load(scan)
    assert labels.shape == image.shape and np.allclose(labels.affine, image.affine)
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2}
