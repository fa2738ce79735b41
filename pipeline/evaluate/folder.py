"""Folder evaluation: any folder of predicted label maps against a folder of reference label maps
(as nnU-Net's `nnUNetv2_evaluate_folder`), whatever tool wrote the predictions.

Cases pair by file name (`<case>.nii.gz` or `.nii` in both folders). Before anything is scored
(and before the report folder is made), everything is checked, one line per problem naming the
file, and any problem stops the whole evaluation (exit status 2): `--pred` and `--ref` the same
folder; two files for one case (`a.nii` and `a.nii.gz`); a reference without a prediction; a
label map that cannot be read, is truncated, is not 3D, holds non-integer values or, with
`--labels`, values the labels file does not declare; a prediction on another voxel grid than its
reference (shape, or affine more than 1e-3 mm apart). Predictions without a reference are left
out, with a warning.

Classes come from `--labels dataset.json` (MSD `{"1": "liver"}` or nnU-Net `{"liver": 1}`), or
else are every label value found in the references and predictions. Per case and class: Dice
(empty-reference rule `nnunet` by default, `monai` on request; pipeline.common.metrics), HD95 in
the reference's voxel sizes (mm), and the false positive and false negative voxel counts.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from tqdm.auto import tqdm

from pipeline.common.cli import output_folder_problem
from pipeline.common.geometry import volume_problem
from pipeline.common.metrics import EmptyRule, class_metrics
from pipeline.evaluate.cases import EvaluateError
from pipeline.evaluate.report import CaseRow, mlflow_metrics, overall_dice, write_report
from pipeline.evaluate.run import Evaluation

log = logging.getLogger(__name__)

NIFTI_ENDINGS = (".nii.gz", ".nii")
AFFINE_TOLERANCE_MM = 1e-3
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)  # nibabel's ways to fail on a bad file


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


def nifti_files(folder: Path) -> dict[str, list[Path]]:
    """Case id (file name without its NIfTI ending) -> its NIfTI files in `folder` (one, unless
    the case is there twice, as `a.nii` and `a.nii.gz`)."""
    if not folder.is_dir():
        raise EvaluateError(f"{folder}: no such folder")
    files: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        ending = next((e for e in NIFTI_ENDINGS if path.name.endswith(e)), None)
        if ending and path.is_file() and not path.name.startswith("."):
            files.setdefault(path.name[: -len(ending)], []).append(path)
    return files


def duplicate_problems(files: dict[str, list[Path]]) -> list[str]:
    """One line per case with more than one file."""
    return [f"{paths[0]}: case {case!r} has {len(paths)} files (also {', '.join(p.name for p in paths[1:])}); "
            "keep one" for case, paths in files.items() if len(paths) > 1]


def pair_cases(pred: Path, ref: Path) -> list[CasePair]:
    """One pair per reference; EvaluateError with one line per problem (same folder, a case
    with two files, a missing prediction)."""
    references, predictions = nifti_files(ref), nifti_files(pred)
    if pred.samefile(ref):
        raise EvaluateError(f"{pred}: --pred and --ref are the same folder (every case would score 1.0)")
    if not references:
        raise EvaluateError(f"{ref}: no NIfTI reference files (.nii, .nii.gz) in this folder")
    problems = duplicate_problems(references) + duplicate_problems(predictions)
    problems += [f"{pred}/{case}{NIFTI_ENDINGS[0]}: no prediction for reference {paths[0]}"
                 for case, paths in references.items() if case not in predictions]
    if problems:
        raise EvaluateError("\n".join(problems))
    extra = sorted(set(predictions) - set(references))
    if extra:
        log.warning("%s: %d prediction(s) without a reference left out: %s", pred, len(extra), ", ".join(extra))
    return [CasePair(case, predictions[case][0], paths[0]) for case, paths in references.items()]


def _header(path: Path) -> nib.Nifti1Image:
    try:
        return nib.load(path)
    except READ_ERRORS as err:
        raise EvaluateError(f"{path}: not a readable NIfTI file ({_first_line(err)})") from None


def grid_problems(pairs: list[CasePair]) -> list[str]:
    """One line per label map that is unreadable, not 3D or with a singular or non-finite affine
    (ingest's and predict's rule), and per prediction not on its reference's voxel grid."""
    problems = []
    for pair in pairs:
        try:
            prediction, reference = _header(pair.prediction), _header(pair.reference)
        except EvaluateError as err:
            problems.append(str(err))
            continue
        volume = [f"{path}: {problem}" for path, image in ((pair.prediction, prediction), (pair.reference, reference))
                  if (problem := volume_problem(image.shape, image.affine))]
        if volume:
            problems += volume
        elif len(reference.shape) != 3 or len(prediction.shape) != 3:
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
    """The label map's voxels; EvaluateError for truncated or corrupt data and non-integer values."""
    try:
        data = np.asanyarray(_header(path).dataobj)
    except READ_ERRORS as err:
        raise EvaluateError(f"{path}: corrupt NIfTI data ({_first_line(err)})") from None
    if not np.array_equal(data, np.round(data)):
        raise EvaluateError(f"{path}: not a label map (non-integer values)")
    return data.astype(np.int64)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def label_values(pairs: list[CasePair]) -> tuple[dict[Path, set[int]], list[str]]:
    """The values of every reference and prediction, and one line per map that cannot be read as one."""
    values, problems = {}, []
    for path in (p for pair in pairs for p in (pair.reference, pair.prediction)):
        try:
            values[path] = set(np.unique(_read(path)).tolist())
        except EvaluateError as err:
            problems.append(str(err))
    return values, problems


def undeclared_problems(values: dict[Path, set[int]], table: dict[int, str], source: str) -> list[str]:
    """One line per label map holding values that the labels file `source` does not declare."""
    return [f"{path}: label values {sorted(extra)} not declared in {source}"
            for path, found in values.items() if (extra := found - table.keys())]


def found_labels(values: dict[Path, set[int]]) -> dict[int, str]:
    """Every label value in the references and predictions, named by its id."""
    found = set().union(*values.values(), {0})
    return {v: "background" if v == 0 else f"class {v}" for v in sorted(found)}


def check_folder(pred: Path, ref: Path, labels: Path | None = None) -> tuple[list[CasePair], dict[int, str]]:
    """The case pairs and the class table, once every check of the module docstring has passed;
    EvaluateError with one line per problem otherwise."""
    declared = read_labels(labels) if labels is not None else None
    pairs = pair_cases(pred, ref)
    problems = grid_problems(pairs)
    if problems:
        raise EvaluateError("\n".join(problems))
    values, problems = label_values(pairs)
    if declared:
        problems += undeclared_problems(values, declared, str(labels))
    if problems:
        raise EvaluateError("\n".join(problems))
    return pairs, declared or found_labels(values)


def score_folder(pred: Path, ref: Path, labels: Path | None = None, empty: EmptyRule = "nnunet",
                 task: str | None = None, output: Path | None = None) -> list[CaseRow]:
    """Check every pair (and the report folder `output`, when given, so that a bad one costs no
    scoring), then score each case and foreground class (module docstring)."""
    pairs, table = check_folder(pred, ref, labels)
    problem = output_folder_problem(str(output)) if output is not None else None
    if problem:
        raise EvaluateError(problem)
    rows = []
    for pair in tqdm(pairs, desc="cases", disable=None):
        reference = nib.load(pair.reference)
        spacing = tuple(float(s) for s in nib.affines.voxel_sizes(reference.affine))
        metrics = class_metrics(_read(pair.prediction), _read(pair.reference), table, spacing, empty)
        rows += [CaseRow(task or ref.name, pair.case_id, m) for m in metrics]
    log.info("scored %d case(s) of %s against %s (%d classes, empty-reference rule %s)", len(pairs), pred, ref,
             len(table) - 1, empty)
    return rows


def run_folder(options: FolderOptions) -> Evaluation:
    """Score the folder pair and write the report (metrics.csv, summary.md, summary.json, box plots)."""
    rows = score_folder(options.pred, options.ref, options.labels, options.empty, output=options.output)
    title = f"Evaluation of {options.pred} against {options.ref} (empty-reference rule: {options.empty})"
    summaries, files = write_report(rows, options.output, title)
    log.info("mean Dice: %.4f; report in %s", overall_dice(summaries), options.output)
    return Evaluation(rows, files, mlflow_metrics(summaries, "folder"), None)
