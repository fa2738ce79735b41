"""Folder evaluation: any folder of predicted label maps against a folder of reference label maps
(as nnU-Net's `nnUNetv2_evaluate_folder`), whatever tool wrote the predictions.

Cases pair by file name (`<case>.nii.gz` or `.nii` in both folders). Before anything is scored,
every pair is checked: a reference without a prediction, a prediction that is not 3D, or one on
another voxel grid (shape, or affine more than 1e-3 mm apart) is one line each, and the whole
evaluation stops (exit status 2). Predictions without a reference are left out, with a warning.

Classes come from `--labels dataset.json` (MSD `{"1": "liver"}` or nnU-Net `{"liver": 1}`), or
else are every label value found in the references and predictions. Per case and class: Dice
(empty-reference rule `nnunet` by default, `monai` on request; pipeline.common.metrics), HD95 in
the reference's voxel sizes (mm), and the false positive and false negative voxel counts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from tqdm.auto import tqdm

from pipeline.common.metrics import EmptyRule, class_metrics
from pipeline.evaluate.cases import EvaluateError
from pipeline.evaluate.report import CaseRow, mlflow_metrics, overall_dice, write_report
from pipeline.evaluate.run import Evaluation

log = logging.getLogger(__name__)

NIFTI_ENDINGS = (".nii.gz", ".nii")
AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class FolderOptions:
    pred: Path  # predicted label maps
    ref: Path  # reference label maps
    output: Path  # report folder
    labels: Path | None = None  # dataset.json naming the classes
    empty: EmptyRule = "nnunet"


@dataclass(frozen=True)
class CasePair:
    case_id: str
    prediction: Path
    reference: Path


def nifti_files(folder: Path) -> dict[str, Path]:
    """Case id (file name without its NIfTI ending) -> file, for the NIfTI files of `folder`."""
    if not folder.is_dir():
        raise EvaluateError(f"{folder}: no such folder")
    files = {}
    for path in sorted(folder.iterdir()):
        ending = next((e for e in NIFTI_ENDINGS if path.name.endswith(e)), None)
        if ending and path.is_file() and not path.name.startswith("."):
            files[path.name[: -len(ending)]] = path
    return files


def pair_cases(pred: Path, ref: Path) -> list[CasePair]:
    """One pair per reference; EvaluateError with one line per missing prediction."""
    references, predictions = nifti_files(ref), nifti_files(pred)
    if not references:
        raise EvaluateError(f"{ref}: no NIfTI reference files (.nii, .nii.gz) in this folder")
    missing = [f"{pred}/{case}{NIFTI_ENDINGS[0]}: no prediction for reference {path}"
               for case, path in references.items() if case not in predictions]
    if missing:
        raise EvaluateError("\n".join(missing))
    extra = sorted(set(predictions) - set(references))
    if extra:
        log.warning("%s: %d prediction(s) without a reference left out: %s", pred, len(extra), ", ".join(extra))
    return [CasePair(case, predictions[case], path) for case, path in references.items()]


def grid_problems(pairs: list[CasePair]) -> list[str]:
    """One line per prediction that is unreadable, not 3D, or not on its reference's voxel grid."""
    problems = []
    for pair in pairs:
        try:
            prediction, reference = nib.load(pair.prediction), nib.load(pair.reference)
        except (OSError, ImageFileError) as err:
            problems.append(f"{pair.prediction}: cannot read the pair ({err})")
            continue
        if len(reference.shape) != 3 or len(prediction.shape) != 3:
            problems.append(f"{pair.prediction}: label maps must be 3D, got {prediction.shape} "
                            f"(reference {reference.shape})")
        elif prediction.shape != reference.shape:
            problems.append(f"{pair.prediction}: shape {prediction.shape} != reference {pair.reference} "
                            f"shape {reference.shape}")
        elif not np.allclose(prediction.affine, reference.affine, atol=AFFINE_TOLERANCE_MM, rtol=0):
            apart = float(np.abs(prediction.affine - reference.affine).max())
            problems.append(f"{pair.prediction}: affine differs from reference {pair.reference} by up to "
                            f"{apart:.4g} mm")
    return problems


def read_labels(path: Path) -> dict[int, str]:
    """Label id -> name from a dataset.json in MSD (`{"1": "liver"}`) or nnU-Net (`{"liver": 1}`) form."""
    try:
        raw = json.loads(path.read_text()).get("labels")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise EvaluateError(f"{path}: unreadable dataset.json ({err})") from None
    if not isinstance(raw, dict) or not raw:
        raise EvaluateError(f"{path}: 'labels' must be a non-empty mapping, got {raw!r}")
    try:
        if all(str(k).isdigit() for k in raw):
            return {int(k): str(v) for k, v in raw.items()}
        return {int(v): str(k) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise EvaluateError(f"{path}: 'labels' ids must be integers (region-based labels are not supported)") from None


def _read(path: Path) -> np.ndarray:
    data = np.asanyarray(nib.load(path).dataobj)
    if not np.array_equal(data, np.round(data)):
        raise EvaluateError(f"{path}: not a label map (non-integer values)")
    return data.astype(np.int64)


def found_labels(pairs: list[CasePair]) -> dict[int, str]:
    """Every label value in the references and predictions, named by its id."""
    values: set[int] = set()
    for pair in pairs:
        values |= set(np.unique(_read(pair.reference)).tolist()) | set(np.unique(_read(pair.prediction)).tolist())
    return {v: "background" if v == 0 else f"class {v}" for v in sorted(values | {0})}


def score_folder(pred: Path, ref: Path, labels: Path | None = None, empty: EmptyRule = "nnunet",
                 task: str | None = None) -> list[CaseRow]:
    """Check every pair, then score each case and foreground class (module docstring)."""
    pairs = pair_cases(pred, ref)
    problems = grid_problems(pairs)
    if problems:
        raise EvaluateError("\n".join(problems))
    table = read_labels(labels) if labels is not None else found_labels(pairs)
    name = task or ref.name
    rows = []
    for pair in tqdm(pairs, desc="cases", disable=None):
        reference = nib.load(pair.reference)
        spacing = tuple(float(s) for s in nib.affines.voxel_sizes(reference.affine))
        metrics = class_metrics(_read(pair.prediction), _read(pair.reference), table, spacing, empty)
        rows += [CaseRow(name, pair.case_id, m) for m in metrics]
    log.info("scored %d case(s) of %s against %s (%d classes, empty-reference rule %s)", len(pairs), pred, ref,
             len(table) - 1, empty)
    return rows


def run_folder(options: FolderOptions) -> Evaluation:
    """Score the folder pair and write the report (metrics.csv, summary.md, summary.json, box plots)."""
    rows = score_folder(options.pred, options.ref, options.labels, options.empty)
    title = f"Evaluation of {options.pred} against {options.ref} (empty-reference rule: {options.empty})"
    summaries, files = write_report(rows, options.output, title)
    log.info("mean Dice: %.4f; report in %s", overall_dice(summaries), options.output)
    return Evaluation(rows, files, mlflow_metrics(summaries, "folder"), None)
