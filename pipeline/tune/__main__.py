"""Search model and recipe choices with Ray Tune: `python -m pipeline.tune --config FILE`.

`python -m pipeline.tune --config FILE [--set key=value ...] [--resume | --new]`.

The config's `tune` section holds the search space (dotted config keys), the number of trials,
ASHA and the searcher; each trial is a short `pipeline.train` run. A search whose folder
(`<ray.storage_path>/<name>`) holds Tune state is resumed by default (`--new` refuses that,
`--resume` requires it). The best config is written to `tune.best_config`, ready for
`python -m pipeline.train --config`. Exit status 1 when the search failed, 2 for a bad config.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.common.cli import run_stage, stage_parser
from pipeline.common.config import ConfigError, load_config
from pipeline.common.logs import setup_logging
from pipeline.tune.run import run

log = logging.getLogger("pipeline.tune")


def _parser() -> argparse.ArgumentParser:
    p = stage_parser("pipeline.tune", __doc__, ["data", "model", "train", "ray", "mlflow", "tune"])
    p.add_argument("--config", required=True, metavar="YAML", help="experiment config with a tune section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set tune.num_samples=16 (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the interrupted search (must exist)")
    mode.add_argument("--new", action="store_true", help="start a new search (must not exist)")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = _parser().parse_args(argv)
    return run_stage(lambda: _search(args), log, "search", (ConfigError, FileNotFoundError, FileExistsError, ValueError))


def _search(args: argparse.Namespace) -> None:
    resume = True if args.resume else (False if args.new else None)
    log.info("done: %s", run(load_config(args.config, args.overrides), resume=resume))


if __name__ == "__main__":
    sys.exit(main())
