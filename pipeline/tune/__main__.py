"""Search model and recipe choices with Ray Tune: `python -m pipeline.tune --config FILE`.

`python -m pipeline.tune --config FILE [--set key=value ...] [--resume]`.

The config's `tune` section holds the search space (dotted config keys), the number of trials,
ASHA and the searcher; each trial is a short `pipeline.train` run. A new search refuses a
search folder (`<ray.storage_path>/<name>`) that exists; `--resume` continues the interrupted
search there (it unpickles Tune's saved state: resume only searches you trust). The best config is written to `tune.best_config`, ready for
`python -m pipeline.train --config`. Exit status 1 when the search failed, 2 for a bad config.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.common.cli import run_stage, stage_parser
from pipeline.common.config import ConfigError, load_config
from pipeline.common.logs import setup_logging
from pipeline.common.tracking import TrackingUnavailable
from pipeline.tune.run import SearchError, run

log = logging.getLogger("pipeline.tune")


def _parser() -> argparse.ArgumentParser:
    p = stage_parser("pipeline.tune", __doc__, ["data", "model", "train", "ray", "mlflow", "tune"])
    p.add_argument("--config", required=True, metavar="YAML", help="experiment config with a tune section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set tune.num_samples=16 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search of this name (unpickles its state; without it an "
                        "existing search folder is an error)")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = _parser().parse_args(argv)
    return run_stage(lambda: _search(args), log, "search", (ConfigError, SearchError, TrackingUnavailable))


def _search(args: argparse.Namespace) -> None:
    log.info("done: %s", run(load_config(args.config, args.overrides), resume=args.resume))


if __name__ == "__main__":
    sys.exit(main())
