"""Import a model trained with the UniSeg reference code: `python -m pipeline.import_reference`.

`python -m pipeline.import_reference CHECKPOINT.model -o MODEL_DIR [--facts FILE.yaml]
[--register NAME [--alias ALIAS] [--experiment NAME] [--tracking-uri URI] [--name RUN]]`

CHECKPOINT.model and CHECKPOINT.model.pkl are the two files nnU-Net v1 writes (the reference's
released "UniSeg_11_Tasks" model and its configuration file, renamed as its README says). Neither
runs any code: the .model is read with torch.load(weights_only=True), the .pkl with a restricted
unpickler. The network comes from the checkpoint's tensor shapes and the plans; the tasks'
names, labels, modalities, spacing and normalisation from --facts (default
configs/import_reference.yaml: the reference's published values), and the import logs which
fact came from where. MODEL_DIR is a model folder like any trained model's (predict, evaluate
and finetune take it); --register also logs it to MLflow and registers it as NAME.

Exit status: 0 imported; 2 bad input (a checkpoint that is not the reference's, a pickle that
asks for code, facts that do not fit the checkpoint, an unreachable tracking server); 1 other
failures (traceback logged).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys

from model.reference_layout import ReferenceLayoutError
from pipeline.common.cli import run_stage, stage_parser
from pipeline.common.logs import setup_logging
from pipeline.common.tracking import TrackingUnavailable
from pipeline.import_reference.checkpoint import ReferenceCheckpointError
from pipeline.import_reference.facts import FactsError
from pipeline.import_reference.run import DEFAULT_FACTS, run

log = logging.getLogger("pipeline.import_reference")


def _parser() -> argparse.ArgumentParser:
    p = stage_parser("pipeline.import_reference", __doc__)
    p.add_argument("checkpoint", metavar="CHECKPOINT.model", help="the reference's *.model (its .pkl beside it)")
    p.add_argument("-o", "--out", required=True, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--facts", default=str(DEFAULT_FACTS), metavar="YAML",
                   help="task facts the checkpoint lacks (default: %(default)s)")
    p.add_argument("--register", metavar="NAME", help="log to MLflow and register as NAME")
    p.add_argument("--alias", metavar="ALIAS", help="with --register: set this alias on the new version")
    p.add_argument("--experiment", default="uniseg", help="with --register: MLflow experiment (default: %(default)s)")
    p.add_argument("--tracking-uri", metavar="URI", help="with --register: default MLFLOW_TRACKING_URI or ./mlflow.db")
    p.add_argument("--name", default="import-reference", help="with --register: run name (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = _parser().parse_args(argv)
    if args.alias and not args.register:
        _parser().error("--alias needs --register")
    return run_stage(
        lambda: run(args.checkpoint, args.out, args.facts, register=args.register, alias=args.alias,
                    tracking_uri=args.tracking_uri, experiment=args.experiment, run_name=args.name),
        log, "import",
        (FileNotFoundError, ReferenceCheckpointError, ReferenceLayoutError, FactsError, TrackingUnavailable,
         pickle.UnpicklingError),
    )


if __name__ == "__main__":
    sys.exit(main())
