"""Fine-tune a universal model on a new task: `python -m pipeline.finetune --pretrained URI --store STORE`.

`python -m pipeline.finetune --pretrained models:/NAME@ALIAS --store NEW_STORE [--config FILE]
[--from-scratch | --add-task] [--name RUN] [--register NAME] [--set key=value ...] [--resume]`.

The config (default: all defaults) gives the recipe; `--set finetune.freeze_encoder_epochs=N`,
`finetune.warmup_epochs`, `finetune.layer_decay`, `train.learning_rate` set the schedule.
`--from-scratch` trains the same architecture from random weights (the baseline). The result is
registered as `--register` (default: `<mlflow.registered_model>-finetune`).

`--add-task` keeps the universal model and adds the store's task to it (`--store` repeatable: one
task per store): a new prompt slot and FUSE output maps, the old weights frozen, so the old tasks
predict as before; the result is a new version of the pretrained registered model (default), with
all tasks on its card.
Exit status 1 when training failed, 2 for a bad config or command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common.cli import run_stage, stage_parser
from pipeline.common.config import ConfigError, config_from_dict, load_config, to_dict
from pipeline.common.config_sources import COMMAND_LINE
from pipeline.common.logs import setup_logging
from pipeline.common.tracking import TrackingUnavailable
from pipeline.train.finetune import pin_pretrained
from pipeline.train.run import RunExistsError, run

log = logging.getLogger("pipeline.finetune")


def _parser() -> argparse.ArgumentParser:
    p = stage_parser("pipeline.finetune", __doc__, ["model", "train", "ray", "mlflow", "finetune"])
    p.add_argument("--pretrained", required=True, metavar="URI",
                   help="source model: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a folder")
    p.add_argument("--store", required=True, action="append", metavar="STORE",
                   help="Zarr store of the new task (pipeline.ingest); repeatable with --add-task")
    p.add_argument("--config", metavar="YAML", help="experiment config for the recipe (configs/*.yaml)")
    p.add_argument("--from-scratch", action="store_true", help="same architecture, random weights (baseline)")
    p.add_argument("--add-task", action="store_true",
                   help="add the task to the universal model (old tasks frozen) instead of transferring it")
    p.add_argument("--name", metavar="RUN", help="run name (default: <config name>-finetune[-scratch])")
    p.add_argument("--register", metavar="NAME", help="registered model name of the result")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set finetune.freeze_encoder_epochs=2 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run --name")
    return p


def _finetune(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    raw = to_dict(cfg)
    raw["data"]["stores"] = [str(Path(s).resolve()) if "://" not in s else s for s in args.store]
    raw["finetune"]["pretrained"] = args.pretrained
    raw["finetune"]["from_scratch"] = args.from_scratch or raw["finetune"]["from_scratch"]
    raw["finetune"]["add_task"] = args.add_task or raw["finetune"]["add_task"]
    suffix = ("-add-task" if raw["finetune"]["add_task"] else
              "-finetune-scratch" if raw["finetune"]["from_scratch"] else "-finetune")
    raw["name"] = args.name or f"{raw['name']}{suffix}"
    default = (registered_name(args.pretrained) if raw["finetune"]["add_task"] else None) \
        or f"{raw['mlflow']['registered_model'] or 'uniseg'}{suffix}"
    raw["mlflow"]["registered_model"] = args.register or default
    log.info("done: %s", run(pin_pretrained(config_from_dict(raw, source=COMMAND_LINE)), resume=args.resume))


def registered_name(uri: str) -> str | None:
    """NAME of models:/NAME@ALIAS or models:/NAME/VERSION; None for other URIs."""
    if not uri.startswith("models:/"):
        return None
    return uri.removeprefix("models:/").split("@", 1)[0].split("/", 1)[0]


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = _parser().parse_args(argv)
    return run_stage(lambda: _finetune(args), log, "fine-tuning",
                     (ConfigError, RunExistsError, FileNotFoundError, TrackingUnavailable))


if __name__ == "__main__":
    sys.exit(main())
