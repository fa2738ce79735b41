"""Train a universal segmentation network on Ray: `python -m pipeline.train --config FILE`.

`python -m pipeline.train --config FILE [--set key=value ...] [--resume RUN] [--folds all|0,1,...]`.

Starts a local Ray when no cluster is given (`ray.address`, RAY_ADDRESS); the same command runs
as a Ray job: `ray job submit --working-dir . -- python -m pipeline.train --config FILE`.
`--resume RUN` continues a stopped run (its saved config is used when --config is left out).
`--folds` cross-validates instead: the stores' folds (from ingest) as concurrent Ray Train runs,
a summary per task and class (mean and std over folds, pooled Dice over the out-of-fold cases),
the fold ensemble registered (pipeline/train/folds.py); `--folds ... --resume RUN` with the same
--config runs the folds that did not finish, each from its checkpoint.
Exit status 1 when training failed, 2 for a bad config or command line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.common.cli import run_stage, stage_parser
from pipeline.common.config import ConfigError, load_config
from pipeline.common.ensemble import parse_folds
from pipeline.common.logs import setup_logging
from pipeline.common.tracking import TrackingUnavailable
from pipeline.train.folds import run_cv
from pipeline.train.run import RunExistsError, config_for_resume, run

log = logging.getLogger("pipeline.train")


def _parser() -> argparse.ArgumentParser:
    p = stage_parser("pipeline.train", __doc__, ["data", "model", "train", "ray", "mlflow"])
    p.add_argument("--config", metavar="YAML", help="experiment config (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=10 (repeatable)")
    p.add_argument("--resume", metavar="RUN", help="continue the run named RUN (or at the folder RUN)")
    p.add_argument("--folds", type=parse_folds, default=False, metavar="all|0,1,...",
                   help="cross-validate over these folds of the stores (all: every fold), in parallel on Ray")
    return p


def _train(args: argparse.Namespace) -> None:
    if args.config:
        overrides = args.overrides + ([f"name={args.resume}"] if args.resume else [])
        cfg = load_config(args.config, overrides)
    elif args.resume:
        cfg = config_for_resume(args.resume, args.overrides)
    else:
        raise ConfigError("give --config FILE (or --resume RUN to continue a run)")
    if args.folds is not False:
        if not args.config:
            raise ConfigError("--folds needs --config FILE (also with --resume)")
        result = run_cv(cfg, args.folds, resume=args.resume is not None)
        log.info("done: cross-validation %s, model %s, summary %s", result.name, result.model_uri, result.files)
        return
    log.info("done: %s", run(cfg, resume=args.resume is not None))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = _parser().parse_args(argv)
    bad_input = (ConfigError, RunExistsError, FileNotFoundError, TrackingUnavailable)
    return run_stage(lambda: _train(args), log, "training", bad_input)


if __name__ == "__main__":
    sys.exit(main())
