"""Concurrent writers on the default tracking store lose nothing (issue 22, item 4).

Six processes start at the same moment on a fresh default store (`sqlite:///<cwd>/mlflow.db`,
no MLFLOW_TRACKING_URI): each prepares it (`resolve_tracking_uri`), creates or finds the same
experiment, opens a run and logs metrics one by one and in batches, params and artifacts. Every
value must be there afterwards. Without the preparation lock, processes that create a fresh
store's tables at once fail (alembic: "table ... already exists"); cross-validation over 3
concurrent folds on the default store is in test_cross_validation.py.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.common.tracking import resolve_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
WRITERS = 6
STEPS = 20
ARTIFACT_EVERY = 5

WRITER = """
import sys, time
from pathlib import Path
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from pipeline.common.tracking import ensure_experiment, resolve_tracking_uri

index, steps, every, ready, start = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
ready.touch()
while not start.exists():
    time.sleep(0.01)
uri = resolve_tracking_uri(None)
client = MlflowClient(uri)
run = client.create_run(ensure_experiment("concurrent", uri), run_name=f"writer{index}", tags={"writer": str(index)})
run_id = run.info.run_id
for step in range(steps):
    client.log_metric(run_id, "loss", index * 1000 + step, step=step)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"dice/{k}", index + step / 100 + k, now, step) for k in range(3)],
                     params=[Param(f"p{step}", f"{index}-{step}")])
    if step % every == 0:
        path = ready.with_name(f"writer{index}-step{step}.txt")
        path.write_text(f"{index} {step}")
        client.log_artifact(run_id, str(path), "files")
client.set_terminated(run_id)
"""


def test_concurrent_writers_on_the_default_store_lose_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
    start = tmp_path / "start"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), str(STEPS), str(ARTIFACT_EVERY),
                                 str(tmp_path / f"ready{i}"), str(start)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(WRITERS)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(WRITERS)):  # imports done everywhere
        assert time.monotonic() < deadline and all(w.poll() is None for w in writers), \
            [w.communicate()[0][-2000:] for w in writers if w.poll() is not None]
        time.sleep(0.05)
    assert not (tmp_path / "mlflow.db").exists()  # the store is created by the writers, all at once
    start.touch()
    outputs = [w.communicate(timeout=600)[0] for w in writers]
    failed = {i: out[-2000:] for i, (w, out) in enumerate(zip(writers, outputs)) if w.returncode}
    assert not failed, failed

    uri = resolve_tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    with sqlite3.connect(tmp_path / "mlflow.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert sorted(int(r.data.tags["writer"]) for r in runs) == list(range(WRITERS))
    for run in runs:
        index, run_id = int(run.data.tags["writer"]), run.info.run_id
        assert run.info.status == "FINISHED"
        loss = client.get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in loss) == [(s, index * 1000 + s) for s in range(STEPS)]
        for k in range(3):
            history = client.get_metric_history(run_id, f"dice/{k}")
            assert sorted((m.step, round(m.value, 6)) for m in history) == \
                [(s, round(index + s / 100 + k, 6)) for s in range(STEPS)]
        assert run.data.params == {f"p{s}": f"{index}-{s}" for s in range(STEPS)}
        files = {Path(a.path).name for a in client.list_artifacts(run_id, "files")}
        assert files == {f"writer{index}-step{s}.txt" for s in range(0, STEPS, ARTIFACT_EVERY)}
