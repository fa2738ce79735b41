"""`pipeline.predict`: label maps for raw NIfTI scans, on the scans' own grids and affines.

Order of work: check the tracking server (for a models:/ or runs:/ model), load the model
(registry, run or folder), find and check every scan, pick the tasks per scan and the output
paths (refusing existing ones without `overwrite`; with `resume` a scan whose every output
exists is kept and not recomputed), create the output folder and prove it
writable; only then predict, in this process or spread over Ray workers.

Each scan fails alone: a scan that cannot be read or run is logged as one line naming its file,
the others are written, and the run ends with a summary. Exit status: 0 every scan written;
2 some scans were bad input (and nothing else failed), or the model, options or output folder
are bad (then nothing ran); 1 a scan failed for another reason (its traceback is logged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from pipeline.common.cli import BatchFailed, output_folder_problem
from pipeline.common.inference import InferenceOptions, resolve_device
from pipeline.common.mlflow_model import load_model
from pipeline.common.model_card import ModelCard
from pipeline.common.tracking import check_model_tracking, use_tracking_uri
from pipeline.predict.distributed import RayOptions, run_on_ray
from pipeline.predict.io import PredictError, find_scans
from pipeline.predict.job import Job, Outcome, attempt_job, plan_jobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictOptions:
    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a model folder
    task: str  # a task name of the model, or "all"
    input: Path  # a NIfTI file or a folder of them
    output: Path
    modalities: tuple[str, ...] = ()  # the input's channel modalities, checked against the task
    overwrite: bool = False
    resume: bool = False  # keep the scans whose every output exists, predict the others
    save_probabilities: bool = False
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    device: str = "auto"
    tracking_uri: str | None = None
    ray: RayOptions | None = None  # None: predict in this process
    folds: tuple[int, ...] | None = None  # of a fold ensemble, the folds to average (None: all)


def run(options: PredictOptions) -> list[Path]:
    """Predict every scan of `options.input`; returns the files written. Raises PredictError
    (bad input) or BatchFailed once the scans that could be predicted are written."""
    use_tracking_uri(options.tracking_uri)
    check_model_tracking(options.model)
    network, card = _load(options.model, "cpu" if options.ray else options.device, options.folds)
    scans, rejected = find_scans(options.input)
    jobs, unplanned = plan_jobs(
        card, scans, options.task, options.output, options.model,
        options.modalities, options.save_probabilities, options.overwrite, options.resume,
    )
    outcomes = [Outcome(problem.split(": ", 1)[0], problem=problem, bad_input=True) for problem in rejected + unplanned]
    batch = len(outcomes) + len(jobs) > 1  # a lone scan's problem is the final message, logged once
    if batch:
        for outcome in outcomes:
            log.error("%s", outcome.problem)
    if jobs:
        problem = output_folder_problem(str(options.output))
        if problem:
            raise PredictError(problem)
        for outcome in _predict(network, card, jobs, options):
            outcomes.append(outcome)
            if batch and outcome.problem:
                log.error("%s", outcome.problem)
    written = [path for outcome in outcomes for path in outcome.written]
    log.info("wrote %d file(s) for %d of %d scan(s) to %s", len(written), sum(o.problem is None for o in outcomes),
             len(outcomes), options.output)
    _raise_for_failures(outcomes, options.output)
    return written


def _predict(network: nn.Module, card: ModelCard, jobs: list[Job], options: PredictOptions) -> Iterator[Outcome]:
    """Each job's outcome as it comes, from this process or from Ray workers."""
    if options.ray:
        yield from run_on_ray(network, card, jobs, options.inference, options.ray)
    else:
        for job in tqdm(jobs, desc="scans", disable=None):
            yield attempt_job(network, card, job, options.inference)


def _raise_for_failures(outcomes: list[Outcome], output: Path) -> None:
    """The end of a run with failed scans: bad input (exit 2) when every failure was the scan's,
    else BatchFailed (exit 1); one line (the problem itself for a lone scan, else a summary)."""
    failed = [o for o in outcomes if o.problem]
    if not failed:
        return
    if len(outcomes) == 1:
        message = failed[0].problem
    else:
        names = ", ".join(Path(o.scan).name for o in failed[:5]) + (", ..." if len(failed) > 5 else "")
        message = (f"{output}: {len(outcomes) - len(failed)} of {len(outcomes)} scan(s) predicted; "
                   f"{len(failed)} failed ({names}; each logged above)")
    if all(o.bad_input for o in failed):
        raise PredictError(message)
    raise BatchFailed(message)


def _load(uri: str, device: str, folds: tuple[int, ...] | None) -> tuple[nn.Module, ModelCard]:
    try:
        return load_model(uri, resolve_device(device), folds)
    except (FileNotFoundError, ValueError) as err:
        raise PredictError(str(err)) from None
