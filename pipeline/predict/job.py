"""One scan's work: which tasks run, where its outputs go, and running it (in-process or on Ray).

Outputs of case `<case>` in the output folder:
    <case>.nii.gz                        label map on the input's grid and affine
    <case>.json                          model, tasks and label id -> name of that map
    <case>_<task>_probabilities.nii.gz   with --save-probabilities: (x, y, z, class) float32
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.common.inference import InferenceOptions, predict_scan
from pipeline.common.model_card import ModelCard
from pipeline.predict.io import PredictError, Scan, label_image, probability_image, read_scan, write_outputs
from pipeline.predict.tasks import label_table, merge_predictions, select_tasks


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


def plan_jobs(
    card: ModelCard,
    scans: Sequence[Scan],
    task: str,
    output: Path,
    model: str,
    modalities: Sequence[str] = (),
    save_probabilities: bool = False,
    overwrite: bool = False,
) -> list[Job]:
    """A job per scan; raises PredictError before any work if a scan cannot run or an output
    exists (without `overwrite`)."""
    duplicates = sorted(case for case, n in Counter(s.case_id for s in scans).items() if n > 1)
    if duplicates:
        raise PredictError(f"{scans[0].files[0].parent}: several inputs for case(s) {', '.join(duplicates)}")
    jobs = [_plan_job(card, scan, task, output, model, modalities, save_probabilities) for scan in scans]
    existing = [path for job in jobs for path in job.paths if path.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise PredictError(f"{existing[0]}: output already exists{more}; pass --overwrite to replace")
    return jobs


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
