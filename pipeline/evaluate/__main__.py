"""`python -m pipeline.evaluate --model models:/NAME@ALIAS --store STORE [--store STORE ...] [--split val|test]`.

Writes metrics.csv (per case and class), summary.md, boxplot_<task>.png and slices_<task>.png
(example slices: image, reference, prediction) into --output and logs them, with the summary
metrics, to the MLflow run of the model. Exit status 1 when the evaluation failed, 2 for bad
input (model, store, options).

Examples:
    python -m pipeline.evaluate --model models:/uniseg@champion --store stores/Task01_Liver.zarr --split val
    python -m pipeline.evaluate --model runs:/<run_id>/model --store s3://bucket/stores/Task01_Liver.zarr \\
        --raw-root /data/raw --space original --tta off -o outputs/evaluate
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from pipeline.common.cli import run_stage, stage_parser
from pipeline.common.inference import add_inference_arguments, inference_options
from pipeline.common.logs import setup_logging
from pipeline.evaluate.cases import EvaluateError
from pipeline.evaluate.run import EvaluateOptions, run

log = logging.getLogger("pipeline.evaluate")
MODEL_HELP = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a model folder"


def parse_args(argv: list[str] | None = None) -> EvaluateOptions:
    parser = stage_parser("pipeline.evaluate", __doc__)
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--store", action="append", required=True,
                        help="a Zarr task store (local or s3://); repeatable")
    parser.add_argument("--split", choices=("val", "validation", "test", "train"), default="val",
                        help="which cases of each store to score (default val; test cases need labels)")
    parser.add_argument("--space", choices=("original", "store"), default="original",
                        help="score on the source files' grids (default) or on the stores' resampled grids")
    parser.add_argument("--raw-root", type=Path, help="folder holding the raw dataset folders, if moved since ingest")
    parser.add_argument("-o", "--output", type=Path, default=Path("outputs/evaluate"),
                        help="report folder (outputs/evaluate)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to the model's MLflow run")
    parser.add_argument("--storage-options", type=json.loads, help="fsspec options for s3:// stores, as JSON")
    add_inference_arguments(parser)
    args = parser.parse_args(argv)
    return EvaluateOptions(
        model=args.model,
        stores=tuple(args.store),
        output=args.output,
        split=args.split,
        space=args.space,
        raw_root=args.raw_root,
        inference=inference_options(parser, args),
        device=args.device,
        tracking_uri=args.tracking_uri,
        log_to_mlflow=not args.no_mlflow,
        storage_options=args.storage_options,
    )


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    options = parse_args(argv)
    return run_stage(lambda: run(options), log, "evaluation", (EvaluateError,))


if __name__ == "__main__":
    sys.exit(main())
