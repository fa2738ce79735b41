"""The fine-tuning driver: pin the pretrained model, then train with `pipeline.train`.

`models:/NAME@ALIAS` is resolved once to `models:/NAME/VERSION`, so every worker (and a resumed
run) loads the same weights, and the source model is loaded here first so a wrong URI fails
before Ray starts. Training, checkpoints, MLflow and registration are `pipeline.train.run`'s.
"""

from __future__ import annotations

import logging

from pipeline.common.config import ConfigError, ExperimentConfig, config_from_dict, to_dict
from pipeline.common.mlflow_model import load_model, pin_model_uri
from pipeline.common.tracking import check_tracking_server, resolve_tracking_uri
from pipeline.train.build import open_stores
from pipeline.train.finetune import check_addition
from pipeline.train.run import TrainResult
from pipeline.train.run import run as train_run

log = logging.getLogger(__name__)


def prepare(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with an absolute tracking URI and the pretrained URI pinned; checks the model."""
    if not cfg.finetune.pretrained:
        raise ConfigError("finetune.pretrained: give the model to start from (--pretrained models:/NAME@ALIAS)")
    if cfg.finetune.add_task and cfg.finetune.from_scratch:
        raise ConfigError("finetune: add_task keeps the pretrained weights; it cannot go with from_scratch")
    if len(cfg.data.stores) != 1 and not cfg.finetune.add_task:
        raise ConfigError(f"data.stores: fine-tuning trains one new task, got {len(cfg.data.stores)} stores")
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    check_tracking_server(tracking_uri, cfg.mlflow)
    pinned = pin_model_uri(cfg.finetune.pretrained, tracking_uri)
    _, card = load_model(pinned, tracking_uri=tracking_uri)
    if cfg.finetune.add_task:
        try:
            check_addition(cfg.finetune.pretrained, card, [s.manifest for s in open_stores(cfg.data.stores)])
        except ValueError as err:
            raise ConfigError(str(err)) from None
    log.info("pretrained %s (%s): %s, tasks %s", cfg.finetune.pretrained, pinned, card.spec.architecture,
             ", ".join(t.name for t in card.tasks))
    raw = to_dict(cfg)
    raw["mlflow"]["tracking_uri"] = tracking_uri
    raw["finetune"]["pretrained"] = pinned
    return config_from_dict(raw, source="finetune")


def run(cfg: ExperimentConfig, resume: bool = False) -> TrainResult:
    """Fine-tune (or, with finetune.from_scratch, train the same architecture from scratch; with
    finetune.add_task, add the stores' tasks to the universal model)."""
    cfg = prepare(cfg)
    return train_run(cfg, resume=resume)
