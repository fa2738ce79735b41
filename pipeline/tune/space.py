"""The search space as data -> Ray Tune domains, and a trial's sampled values -> a config.

Pure functions. Choices that are not scalars (e.g. prompt sizes [2, 3, 3]) are given to Tune as
JSON strings, because model-based searchers (Optuna) only take scalar categories; `trial_config`
decodes them.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pipeline.common.config import ExperimentConfig, SearchParam, TuneConfig, config_from_dict, to_dict

ENCODED = "json:"


def search_space(tune_cfg: TuneConfig) -> dict[str, Any]:
    """`param_space` for the Tuner: one Tune domain per dotted key."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, param in tune_cfg.space.items():
        space[key] = _domain(param, tune)
    return space


def _domain(param: SearchParam, tune: Any) -> Any:
    if param.type == "choice":
        values = list(param.values or ())
        if any(isinstance(v, (list, tuple, dict)) for v in values):
            values = [ENCODED + json.dumps(v) for v in values]
        return tune.choice(values)
    if param.type == "uniform":
        return tune.uniform(param.low, param.high)
    if param.type == "loguniform":
        return tune.loguniform(param.low, param.high)
    return tune.randint(int(param.low), int(param.high))  # type: ignore[arg-type]


def decode(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars from the searchers
        value = value.item()
    if isinstance(value, str) and value.startswith(ENCODED):
        return json.loads(value.removeprefix(ENCODED))
    return value


def sampled_values(trial_params: dict[str, Any], tune_cfg: TuneConfig) -> dict[str, Any]:
    """The trial's values of the searched keys, decoded (other Tune entries ignored)."""
    return {key: decode(trial_params[key]) for key in tune_cfg.space if key in trial_params}


def apply_values(base: ExperimentConfig, values: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    """The base config as a dict with dotted `values` (and `fixed` dotted keys) set."""
    raw = copy.deepcopy(to_dict(base))
    for key, value in {**values, **{k.replace("__", "."): v for k, v in fixed.items()}}.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return raw


def trial_config(base: ExperimentConfig, values: dict[str, Any], name: str, source: str) -> ExperimentConfig:
    """What a trial trains: the sampled values, its own name, and Dice reported every epoch."""
    raw = apply_values(base, values, train__validate_every=1)
    raw["name"] = name
    return config_from_dict(raw, source=source)
