"""`python -m pipeline.predict --model models:/NAME@ALIAS --task TASK -i INPUT -o OUTPUT`.

Examples:
    python -m pipeline.predict --model models:/uniseg@champion --task Task01_SynthLiver -i scan.nii.gz -o out/
    python -m pipeline.predict --model runs:/<run_id>/model --task all --modality CT -i scans/ -o out/ --tta off
    ray job submit --address http://HEAD:8265 -- python -m pipeline.predict --model ... -i /shared/scans \\
        -o /shared/out --task all --modality CT --ray --num-workers 8

Each scan fails alone: a bad scan is logged (one line naming its file), the others are written,
and a summary ends the run. Exit status: 0 every scan written; 2 bad input (scans that could not
be read or run, with the others written; or a bad model, option or output folder, found before
any inference); 1 a scan failed for another reason (traceback logged), the others written.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.common.cli import add_model_arguments, model_options, run_stage, stage_parser
from pipeline.common.inference import add_inference_arguments
from pipeline.common.logs import setup_logging
from pipeline.common.services import LOOPBACK
from pipeline.common.tracking import TrackingUnavailable
from pipeline.predict.distributed import RayOptions
from pipeline.predict.io import PredictError
from pipeline.predict.run import PredictOptions, run

log = logging.getLogger("pipeline.predict")


def parse_args(argv: list[str] | None = None) -> PredictOptions:
    parser = stage_parser("pipeline.predict", __doc__)
    add_model_arguments(parser, required=True)
    parser.add_argument("--task", required=True,
                        help="a task name of the model, its id (0-based, as the UniSeg reference's -task_id), "
                             "or 'all' (every task matching the input, merged)")
    parser.add_argument("-i", "--input", required=True, type=Path, help="a NIfTI file or a folder of NIfTI files")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--modality", default="",
                        help="the input's channel modalities, comma-separated (e.g. CT or T2,ADC): checked "
                             "against --task, and how --task all picks its tasks (required there)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--resume", action="store_true",
                        help="keep the scans whose every output exists (a re-run of a stopped batch), predict the rest")
    parser.add_argument("--save-probabilities", action="store_true", help="also write softmax probabilities per task")
    add_inference_arguments(parser)
    batch = parser.add_argument_group("batch on Ray")
    batch.add_argument("--ray", action="store_true", help="spread the scans over Ray workers")
    batch.add_argument("--num-workers", type=int,
                       help="Ray workers (implies --ray; default: as many as the cluster fits)")
    batch.add_argument("--ray-address",
                       help="Ray cluster address (default: RAY_ADDRESS, the job's cluster, or a local one)")
    batch.add_argument("--host", default=LOOPBACK,
                       help="interface a local Ray started here listens on (default 127.0.0.1; 0.0.0.0: all)")
    batch.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per Ray worker (1)")
    batch.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="GPUs reserved per Ray worker (0; fractions share a GPU)")
    args = parser.parse_args(argv)
    use_ray = args.ray or args.num_workers is not None or args.ray_address is not None
    return PredictOptions(
        **model_options(parser, args),
        task=args.task,
        input=args.input,
        output=args.output,
        modalities=tuple(m.strip() for m in args.modality.split(",") if m.strip()),
        overwrite=args.overwrite,
        resume=args.resume,
        save_probabilities=args.save_probabilities,
        ray=RayOptions(args.ray_address, args.num_workers, args.cpus_per_worker, args.gpus_per_worker, args.device,
                       args.host)
        if use_ray
        else None,
    )


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    options = parse_args(argv)
    return run_stage(lambda: run(options), log, "prediction", (PredictError, TrackingUnavailable))


if __name__ == "__main__":
    sys.exit(main())
