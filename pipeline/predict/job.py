"""One scan's work: which tasks run, where its outputs go, and running it (in-process or on Ray).

Outputs of case `<case>` in the output folder:
    <case>.nii.gz                        label map on the input's grid and affine
    <case>.json                          model, tasks and label id -> name of that map
    <case>_<task>_probabilities.nii.gz   with --save-probabilities: (x, y, z, class) float32

Each scan succeeds or fails alone: `attempt_job` turns a scan's failure into an `Outcome` with its
one-line problem, so one corrupt scan never stops the batch (a scan's outputs appear together,
or not at all).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.common.inference import InferenceOptions, predict_scan
from pipeline.common.model_card import ModelCard
from pipeline.common.nifti import label_image, probability_image
from pipeline.predict.io import PredictError, Scan, read_scan, write_outputs
from pipeline.predict.tasks import ALL_TASKS, label_table, merge_predictions, select_tasks, task_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    scan: Scan
    task_ids: tuple[int, ...]
    labels: dict[int, str]  # label id -> name in the written map
    label_path: Path
    sidecar_path: Path
    probability_paths: dict[int, Path]  # task id -> path; empty unless probabilities are saved
    model: str

    @property
    def paths(self) -> list[Path]:
        return [self.label_path, self.sidecar_path, *self.probability_paths.values()]


@dataclass(frozen=True)
class Outcome:
    """What became of one scan: the files written, or the one-line problem."""

    scan: str
    written: tuple[Path, ...] = ()
    problem: str | None = None
    bad_input: bool = False  # the problem is the scan's (exit status 2), not a failure of ours (1)


def plan_jobs(
    card: ModelCard,
    scans: Sequence[Scan],
    task: str,
    output: Path,
    model: str,
    modalities: Sequence[str] = (),
    save_probabilities: bool = False,
    overwrite: bool = False,
    resume: bool = False,
) -> tuple[list[Job], list[str]]:
    """A job per scan that can run, and one line per scan that cannot (no task takes it, or
    several inputs share its case id). Raises PredictError, before any work, for what stops the
    whole batch: an unknown task, `all` without modalities, an existing output (without
    `overwrite` or `resume`). With `resume`, scans whose every output exists get no job."""
    if task == ALL_TASKS and not modalities:
        raise PredictError("--task all picks the tasks by modality: give the scans' channel modalities with "
                           "--modality (e.g. --modality CT or --modality T2,ADC)")
    if task != ALL_TASKS:
        task_index(card, task)
    counts = Counter(s.case_id for s in scans)
    jobs, problems = [], []
    for scan in scans:
        try:
            if counts[scan.case_id] > 1:
                raise PredictError(f"{scan.name}: another input has the same case id {scan.case_id!r} (one output each)")
            jobs.append(_plan_job(card, scan, task, output, model, modalities, save_probabilities))
        except PredictError as err:
            problems.append(str(err))
    if resume:
        jobs = _unfinished(jobs)
    existing = [path for job in jobs for path in job.paths if path.exists()]
    if existing and not (overwrite or resume):
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise PredictError(f"{existing[0]}: output already exists{more}; pass --overwrite to replace "
                           "or --resume to keep finished scans")
    return jobs, problems


def _unfinished(jobs: list[Job]) -> list[Job]:
    """The jobs not all of whose outputs exist. Outputs are renamed into place whole, so an
    existing one is complete; a scan with only some (a run stopped between renames) runs again."""
    todo = [job for job in jobs if not all(path.exists() for path in job.paths)]
    if len(todo) < len(jobs):
        log.info("%d of %d scan(s) already predicted (every output exists): kept, not recomputed",
                 len(jobs) - len(todo), len(jobs))
    return todo


def _plan_job(
    card: ModelCard,
    scan: Scan,
    task: str,
    output: Path,
    model: str,
    modalities: Sequence[str],
    save_probabilities: bool,
) -> Job:
    task_ids = select_tasks(card, task, scan, modalities)
    probability_paths = {
        i: output / f"{scan.case_id}_{card.tasks[i].name}_probabilities.nii.gz" for i in task_ids if save_probabilities
    }
    return Job(
        scan=scan,
        task_ids=task_ids,
        labels=label_table(card, task_ids),
        label_path=output / f"{scan.case_id}.nii.gz",
        sidecar_path=output / f"{scan.case_id}.json",
        probability_paths=probability_paths,
        model=model,
    )


def attempt_job(network: nn.Module, card: ModelCard, job: Job, options: InferenceOptions) -> Outcome:
    """Run one job; its failure becomes the Outcome's problem (logged with its traceback when
    it is not the scan's fault) instead of stopping the batch."""
    try:
        return Outcome(job.scan.name, tuple(run_job(network, card, job, options)))
    except PredictError as err:
        return Outcome(job.scan.name, problem=str(err), bad_input=True)
    except Exception as err:  # noqa: BLE001 - any failure of one scan must leave the others running
        log.exception("%s: prediction failed", job.scan.name)
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        return Outcome(job.scan.name, problem=f"{job.scan.name}: prediction failed ({type(err).__name__}: {detail})")


def run_job(network: nn.Module, card: ModelCard, job: Job, options: InferenceOptions) -> list[Path]:
    """Read the scan, predict every task of the job, write its outputs atomically."""
    image, affine, header = read_scan(job.scan)
    merge = len(job.task_ids) > 1
    predictions = [
        predict_scan(network, card, i, image, affine, options,
                     probabilities=i in job.probability_paths, foreground=merge)
        for i in job.task_ids
    ]
    labels = merge_predictions(card, job.task_ids, predictions) if merge else predictions[0].labels
    outputs = {
        job.label_path: label_image(labels, affine, header),
        job.sidecar_path: {
            "model": job.model,
            "tasks": [card.tasks[i].name for i in job.task_ids],
            "labels": {str(k): v for k, v in job.labels.items()},
            "source": [str(f) for f in job.scan.files],
        },
    }
    for task_id, prediction in zip(job.task_ids, predictions):
        if task_id in job.probability_paths:
            outputs[job.probability_paths[task_id]] = probability_image(prediction.probabilities, affine, header)
    return write_outputs(outputs)
