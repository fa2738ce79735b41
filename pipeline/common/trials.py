"""Ray Tune trials that each drive a Ray Train run: what `pipeline.tune` (a search) and
`pipeline.train --folds` (cross-validation) share.

- `trial_resources`: what a trial's driver reserves (its Train workers reserve their own);
- `child_run`: the MLflow run of one trial under the job's parent run, reopened when the trial
  runs again (a resumed job, a retried trial).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.common.config import ExperimentConfig, flatten
from pipeline.common.tracking import TrackedRun


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What a trial's driver reserves. Its Train workers reserve their own CPUs; with
    `tune.trial_cpus: 0` the driver holds 1 MiB of Ray's `memory` resource instead (Tune
    refuses an empty request), so N one-CPU trials fit on N cores."""
    if cfg.tune.trial_cpus > 0:
        return {"CPU": cfg.tune.trial_cpus}
    return {"CPU": 0, "memory": float(2**20)}


def child_run(cfg: ExperimentConfig, parent: TrackedRun, key: tuple[str, str],
              tags: Mapping[str, str] | None = None) -> tuple[TrackedRun, bool]:
    """(run, created) of the trial's child run of `parent`, whose tag key[0] is key[1]: reopened
    when it exists, else created with `tags` and the config as params (its `tune` section left out)."""
    params = {k: v for k, v in flatten(cfg).items() if not k.startswith("tune.")}
    return parent.child(*key, name=cfg.name, tags=tags, params=params)
