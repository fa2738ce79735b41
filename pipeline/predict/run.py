"""`pipeline.predict`: label maps for raw NIfTI scans, on the scans' own grids and affines.

Order of work: load the model (registry, run or folder), find and check every scan, pick the
tasks per scan and the output paths (refusing existing ones without `overwrite`); only then
create the output folder and predict, in this process or spread over Ray workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from torch import nn
from tqdm.auto import tqdm

from pipeline.common.inference import InferenceOptions, resolve_device
from pipeline.common.mlflow_model import load_model
from pipeline.common.model_card import ModelCard
from pipeline.predict.distributed import RayOptions, run_on_ray
from pipeline.predict.io import PredictError, find_scans
from pipeline.predict.job import plan_jobs, run_job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictOptions:
    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a model folder
    task: str  # a task name of the model, or "all"
    input: Path  # a NIfTI file or a folder of them
    output: Path
    modalities: tuple[str, ...] = ()  # the input's channel modalities, checked against the task
    overwrite: bool = False
    save_probabilities: bool = False
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    device: str = "auto"
    tracking_uri: str | None = None
    ray: RayOptions | None = None  # None: predict in this process
    folds: tuple[int, ...] | None = None  # of a fold ensemble, the folds to average (None: all)


def run(options: PredictOptions) -> list[Path]:
    """Predict every scan of `options.input`; returns the files written."""
    if options.tracking_uri:
        mlflow.set_tracking_uri(options.tracking_uri)
    network, card = _load(options.model, "cpu" if options.ray else options.device, options.folds)
    scans = find_scans(options.input)
    jobs = plan_jobs(
        card, scans, options.task, options.output, options.model,
        options.modalities, options.save_probabilities, options.overwrite,
    )
    options.output.mkdir(parents=True, exist_ok=True)
    if options.ray:
        written = run_on_ray(network, card, jobs, options.inference, options.ray)
    else:
        progress = tqdm(jobs, desc="scans", disable=None)
        written = [path for job in progress for path in run_job(network, card, job, options.inference)]
    log.info("wrote %d file(s) for %d scan(s) to %s", len(written), len(jobs), options.output)
    return written


def _load(uri: str, device: str, folds: tuple[int, ...] | None) -> tuple[nn.Module, ModelCard]:
    try:
        return load_model(uri, resolve_device(device), folds)
    except (FileNotFoundError, ValueError) as err:
        raise PredictError(str(err)) from None
