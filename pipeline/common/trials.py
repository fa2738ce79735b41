"""Ray Tune trials that each drive a Ray Train run: what `pipeline.tune` (a search) and
`pipeline.train --folds` (cross-validation) share.

- `trial_resources`: what a trial's driver reserves (its Train workers reserve their own);
- `child_run`: the MLflow run of one trial under the job's parent run, reopened when the trial
  runs again (a resumed job, a retried trial).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.common.config import ExperimentConfig, flatten


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What a trial's driver reserves. Its Train workers reserve their own CPUs; with
    `tune.trial_cpus: 0` the driver holds 1 MiB of Ray's `memory` resource instead (Tune
    refuses an empty request), so N one-CPU trials fit on N cores."""
    if cfg.tune.trial_cpus > 0:
        return {"CPU": cfg.tune.trial_cpus}
    return {"CPU": 0, "memory": float(2**20)}


def child_run(cfg: ExperimentConfig, parent_id: str, tracking_uri: str, key: tuple[str, str],
              tags: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(run id, created) of the child run of `parent_id` whose tag key[0] is key[1]: reopened
    (status RUNNING) when it exists, else created with `tags` and the config as params (its
    `tune` section left out)."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_id)
    tag, value = key
    found = client.search_runs([parent.info.experiment_id],
                               f"tags.mlflow.parentRunId = '{parent_id}' and tags.`{tag}` = '{value}'")
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, False
    child = client.create_run(parent.info.experiment_id, run_name=cfg.name,
                              tags={"mlflow.parentRunId": parent_id, tag: value, **(tags or {})})
    params = {k: param_value(v) for k, v in flatten(cfg).items() if not k.startswith("tune.")}
    client.log_batch(child.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
    return child.info.run_id, True


def param_value(value: Any) -> str:
    """A config value as an MLflow param (tuples as lists, cut to MLflow's 6000 characters)."""
    return str(list(value) if isinstance(value, tuple) else value)[:6000]
