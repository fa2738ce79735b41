"""`python -m pipeline.evaluate --model models:/NAME@ALIAS --store STORE [--store STORE ...] [--split val|test]`
or `python -m pipeline.evaluate --pred DIR --ref DIR [--labels dataset.json]`.

Model mode: segments the stores' cases (a fold ensemble averages its folds' softmax; --folds
picks some) and writes metrics.csv (per case and class: Dice, HD95, false positive and negative
voxels), summary.md, summary.json (nnU-Net's keys), boxplot_<task>.png and slices_<task>.png
(example slices: image, reference, prediction) into --output and logs them, with the summary
metrics, to the MLflow run of the model. --split val (and train) are the cases of the fold the
model held out in training (`data.fold`; fold 0 by default); of a fold ensemble, --split val
needs one fold picked (--folds k: fold k's held-out cases, fold k's weights). Folder mode
scores any folder of predicted label maps against a folder of references (same file names,
same voxel grids, label values declared in --labels: one line per problem, all checked before
any scoring) into the same report files; it takes only --labels, --empty-reference and -o
(model options are refused). Dice uses nnU-Net's empty-reference rule unless --empty-reference monai.
Exit status 1 when the evaluation failed, 2 for bad input (model, store, folders, options).

Examples:
    python -m pipeline.evaluate --model models:/uniseg@champion --store stores/Task01_Liver.zarr --split val
    python -m pipeline.evaluate --model runs:/<run_id>/model --store s3://bucket/stores/Task01_Liver.zarr \\
        --raw-root /data/raw --space original --tta off -o outputs/evaluate
    python -m pipeline.evaluate --model models:/uniseg-cv@champion --folds 0,2 --store stores/Task01_Liver.zarr --split test
    python -m pipeline.evaluate --pred outputs/predict --ref raw/Task01_Liver/labelsTs --labels raw/Task01_Liver/dataset.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.common.cli import add_model_arguments, model_options, run_stage, stage_parser
from pipeline.common.inference import add_inference_arguments
from pipeline.common.logs import setup_logging
from pipeline.common.metrics import EMPTY_RULES
from pipeline.common.tracking import TrackingUnavailable
from pipeline.evaluate.cases import EvaluateError
from pipeline.evaluate.folder import FolderOptions, run_folder
from pipeline.evaluate.run import EvaluateOptions, run

log = logging.getLogger("pipeline.evaluate")
FOLDER_MODE = {"pred", "ref", "labels", "empty_reference", "output"}  # the options folder evaluation takes


def parse_args(argv: list[str] | None = None) -> EvaluateOptions | FolderOptions:
    parser = stage_parser("pipeline.evaluate", __doc__)
    add_model_arguments(parser, required=False)
    parser.add_argument("--store", action="append", help="a Zarr task store (local or s3://); repeatable")
    folder = parser.add_argument_group("folder evaluation (instead of --model/--store)")
    folder.add_argument("--pred", type=Path, metavar="DIR", help="folder of predicted label maps (any tool)")
    folder.add_argument("--ref", type=Path, metavar="DIR", help="folder of reference label maps, same file names")
    folder.add_argument("--labels", type=Path, metavar="dataset.json",
                        help="class names (MSD or nnU-Net dataset.json); default: the label values found")
    parser.add_argument("--empty-reference", choices=EMPTY_RULES, default="nnunet",
                        help="Dice where the reference lacks a class: nnunet (0 if predicted, NaN if neither "
                             "has it; default) or monai (always NaN)")
    parser.add_argument("--split", choices=("val", "validation", "test", "train"), default="val",
                        help="which cases of each store to score (default val: those of the fold the model held "
                             "out in training; a fold ensemble needs --folds k or --split test; test cases need "
                             "labels; cases the model trained on are left out)")
    parser.add_argument("--space", choices=("original", "store"), default="original",
                        help="score on the source files' grids (default) or on the stores' resampled grids")
    parser.add_argument("--raw-root", type=Path, help="folder holding the raw dataset folders, if moved since ingest")
    parser.add_argument("-o", "--output", type=Path, default=Path("outputs/evaluate"),
                        help="report folder (outputs/evaluate)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to the model's MLflow run")
    parser.add_argument("--storage-options", type=json.loads, help="fsspec options for s3:// stores, as JSON")
    add_inference_arguments(parser)
    args = parser.parse_args(argv)
    given = given_options(parser, argv)
    if args.pred or args.ref:
        if not (args.pred and args.ref):
            parser.error("folder evaluation takes --pred DIR and --ref DIR")
        model_only = [option for dest, option in given.items() if dest not in FOLDER_MODE]
        if model_only:
            parser.error(f"{', '.join(model_only)}: not for folder evaluation (--pred DIR --ref DIR takes only "
                         "--labels, --empty-reference and -o)")
        return FolderOptions(args.pred, args.ref, args.output, args.labels, args.empty_reference)
    if not (args.model and args.store):
        parser.error("give --model and --store (or --pred and --ref for folder evaluation)")
    if "labels" in given:
        parser.error("--labels: only for folder evaluation (--pred DIR --ref DIR); a model's card names its classes")
    return EvaluateOptions(
        **model_options(parser, args),
        stores=tuple(args.store),
        output=args.output,
        split=args.split,
        space=args.space,
        raw_root=args.raw_root,
        log_to_mlflow=not args.no_mlflow,
        storage_options=args.storage_options,
        empty=args.empty_reference,
    )


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, str]:
    """dest -> option string of each option on the command line, whatever its value (an option
    given with its default value counts), in the parser's order."""
    defaults = {action: action.default for action in parser._actions}
    for action in defaults:
        action.default = argparse.SUPPRESS
    try:
        given = vars(parser.parse_args(argv))
    finally:
        for action, default in defaults.items():
            action.default = default
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.dest in given}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    options = parse_args(argv)
    work = (lambda: run_folder(options)) if isinstance(options, FolderOptions) else (lambda: run(options))
    return run_stage(work, log, "evaluation", (EvaluateError, TrackingUnavailable))


if __name__ == "__main__":
    sys.exit(main())
