"""Ray Tune search on CPU (tiny preset): ASHA stops trials, MLflow parent/child runs, best config,
and an interrupted search that resumes.

Stores: two small synthetic tasks (generator + `python -m pipeline.ingest`). Each trial is one
Ray Train worker with one CPU and a driver that reserves none, so two trials run at once on two
cores. The resume test runs the CLI in a subprocess, interrupts it with SIGINT after the first
trial finished, and runs it again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.common.config import ConfigError, config_from_dict, load_config
from pipeline.common.tracking import prepare_sqlite_store
from pipeline.datasets.synthetic import SyntheticTask, write_task
from pipeline.train.run import check_stores
from pipeline.tune.space import apply_values, sampled_values, search_space, trial_config

ROOT = Path(__file__).resolve().parents[1]
TASKS = (
    SyntheticTask("Task01_TuneLiver", ("CT",), ("background", "liver", "tumour"), spacing=(1.5, 1.5, 4.0),
                  shape=(32, 32, 16), num_cases=5),
    SyntheticTask("Task02_TuneProstate", ("T2",), ("background", "prostate"), spacing=(1.0, 1.0, 3.0),
                  shape=(32, 32, 16), num_cases=5),
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("tune_data")
    command = [sys.executable, "-m", "pipeline.ingest", "--out", str(root / "stores"), "--num-workers", "1"]
    for task in TASKS:
        command += ["--source", str(write_task(root / "raw", task))]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return [str(root / "stores" / f"{t.name}.zarr") for t in TASKS]


@pytest.fixture(scope="module", autouse=True)
def own_ray() -> Iterator[None]:
    """The search starts its own local Ray in this process; shut it down after the module."""
    yield
    import ray

    ray.shutdown()


def tune_config(tmp: Path, stores: list[str], name: str, **tune: object) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "tune-tiny.yaml").read_text())
    raw["name"] = name
    raw["data"]["stores"] = stores
    raw["train"].update(iterations_per_epoch=3)
    raw["ray"].update(storage_path=str(tmp / "ray"), address="local")
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    raw["tune"].update(best_config=str(tmp / f"{name}-best.yaml"), **tune)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_space_and_trial_config() -> None:
    cfg = load_config(ROOT / "configs" / "tune-tiny.yaml")
    space = search_space(cfg.tune)
    assert set(space) == set(cfg.tune.space)
    sampled = {"model.prompt_size": space["model.prompt_size"].categories[1], "train.learning_rate": 0.02,
               "model.prompt_channels": 2}
    values = sampled_values(sampled, cfg.tune)
    assert values["model.prompt_size"] == [1, 2, 2]
    trial = trial_config(cfg, values, "t-1", "trial")
    assert trial.model.prompt_size == (1, 2, 2) and trial.train.learning_rate == 0.02 and trial.name == "t-1"
    assert trial.train.validate_every == 1
    assert apply_values(cfg, values)["train"]["validate_every"] == cfg.train.validate_every
    with pytest.raises(ConfigError, match="train has no key 'lr'"):
        config_from_dict({"tune": {"space": {"train.lr": {"type": "uniform", "low": 0, "high": 1}}}})
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        config_from_dict({"tune": {"space": {"train.learning_rate": {"type": "loguniform", "low": 0, "high": 1}}}})


@pytest.mark.slow
def test_search_asha_mlflow_best_config(stores: list[str], tmp_path: Path) -> None:
    from pipeline.tune.run import run

    started = time.monotonic()
    cfg = load_config(tune_config(tmp_path, stores, "search"))
    result = run(cfg)
    assert result.trials == 4
    assert result.stopped_early >= 1, "ASHA stopped no trial"

    client = MlflowClient(cfg.mlflow.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best/dice/mean"] == pytest.approx(result.best_metric)
    assert "space.train.learning_rate" in parent.data.params
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 4
    assert all("dice/mean" in c.data.metrics for c in children)
    assert sum(c.data.tags["tune.stopped_early"] == "true" for c in children) == result.stopped_early
    assert {c.info.run_name for c in children} == {f"search-{c.data.tags['tune.trial_id']}" for c in children}

    best = load_config(result.best_config_path)  # what `pipeline.train --config` loads
    assert best.name == "search-best" and best.train.validate_every == cfg.train.validate_every
    assert best.train.learning_rate == pytest.approx(result.best_values["train.learning_rate"])
    check_stores(best)
    print(f"search of 4 trials: {time.monotonic() - started:.0f} s")


@pytest.mark.slow
def test_interrupted_search_resumes(stores: list[str], tmp_path: Path) -> None:
    config = tune_config(tmp_path, stores, "resumable", searcher="random", scheduler="fifo", num_samples=2,
                         max_concurrent_trials=1)
    command = [sys.executable, "-m", "pipeline.tune", "--config", str(config)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    cfg = load_config(config)
    prepare_sqlite_store(cfg.mlflow.tracking_uri)  # created here, not by this test's client racing the search's
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    deadline = time.monotonic() + 180
    finished = []
    while time.monotonic() < deadline and first.poll() is None:
        time.sleep(2)
        if not Path(cfg.mlflow.tracking_uri.removeprefix("sqlite:///")).exists():
            continue
        finished = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      "attributes.status = 'FINISHED'")
        if any(r.data.tags.get("stage") == "tune-trial" for r in finished):
            break
    assert first.poll() is None, first.communicate()[0][-3000:]
    os.killpg(first.pid, signal.SIGINT)
    output = first.communicate(timeout=120)[0]
    done_before = {r.data.tags["tune.trial_id"] for r in finished if r.data.tags.get("stage") == "tune-trial"}
    assert done_before, output[-3000:]

    resumed = subprocess.run(command + ["--resume"], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    children = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "tags.stage = 'tune-trial'")
    ids = [c.data.tags["tune.trial_id"] for c in children]
    assert len(ids) == len(set(ids)) == 2, ids
    assert done_before <= set(ids)
    assert all(c.info.status == "FINISHED" for c in children)
    assert Path(cfg.tune.best_config).is_file()
