"""The registered model's predict interface: what goes in and what comes out (its MLflow
signature, written from this description, is `mlflow_model.SIGNATURE`).

The pyfunc model (`pyfunc_model.py`) takes a table, one row per scan: a pandas DataFrame, a list
of row dicts or one row dict in Python; over HTTP (`mlflow models serve`, POST /invocations)
MLflow's JSON, `{"dataframe_records": [{"task": ..., "image": "<base64>"}]}` or
`{"dataframe_split": {"columns": [...], "data": [[...]]}}`, with `"params"` beside it.

Input columns (exactly one of image, path, array per row):
  task    string, required: a task name of the model (its card lists them).
  image   binary: the scan as the bytes of a NIfTI file (.nii or .nii.gz; 3D, or 4D with the
          channels last). Over HTTP: base64.
  path    string: the path of such a file, as the server sees it.
  array   (in Python only) a preprocessed (C, Z, Y, X) float32 array on the task's grid.
Params: `tta` (boolean, false): mirroring test-time augmentation (8 passes); `overlap` (double,
0.5): the fraction of a window its neighbour shares.

Output: a DataFrame (over HTTP `{"predictions": [{...}, ...]}`), one row per input row:
  task    the task.
  labels  image / path rows: the label map as the bytes of a .nii.gz file (uint8, on the scan's
          own voxel grid, with its affine, qform and sform: the file `pipeline.predict` writes;
          over HTTP base64, `pipeline.common.nifti.from_bytes` reads it); array rows: the (Z, Y, X)
          uint8 label array on the array's grid.
  affine  the label map's 4 x 4 voxel-to-millimetre matrix (rows), as the scan's; empty for array rows.
  classes JSON of the task's label values and names, {"0": "background", "1": "liver", ...}.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.common.inference import InferenceOptions
from pipeline.common.model_card import ModelCard

SOURCES = ("image", "path", "array")
EXAMPLE_SHAPE = (16, 16, 8)  # (x, y, z) voxels of the example scan: one window, milliseconds


class BadRequest(ValueError):
    """An input row the model cannot take; the message names the row and the problem."""


@dataclass(frozen=True)
class Request:
    """One input row, checked: the task's index and one source."""

    row: int
    task_id: int
    source: str  # "image", "path" or "array"
    value: Any


def read_rows(model_input: Any, card: ModelCard) -> list[Request]:
    """The checked rows of a DataFrame, a list of row dicts or one row dict."""
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame (MLflow turns JSON input into one)
        records = model_input.to_dict("records")
    elif isinstance(model_input, Mapping):
        records = [model_input]
    elif isinstance(model_input, Sequence) and not isinstance(model_input, str | bytes):
        records = list(model_input)
    else:
        raise BadRequest(f"expected a table of rows (DataFrame, list of dicts or a dict), got {type(model_input).__name__}")
    if not records:
        raise BadRequest("no rows: each row needs a task and one of image, path, array")
    return [_request(i, dict(record), card) for i, record in enumerate(records)]


def _request(row: int, record: dict[str, Any], card: ModelCard) -> Request:
    task = record.get("task")
    if not isinstance(task, str) or not task:
        raise BadRequest(f"row {row}: no task (one of {', '.join(t.name for t in card.tasks)})")
    try:
        task_id = card.task_index(task)
    except ValueError as err:
        raise BadRequest(f"row {row}: {err}") from None
    given = [name for name in SOURCES if _present(record.get(name))]
    if len(given) != 1:
        found = f"got {' and '.join(given)}" if given else "got none"
        raise BadRequest(f"row {row}: give exactly one of image (NIfTI bytes), path, array; {found}")
    return Request(row, task_id, given[0], record[given[0]])


def _present(value: Any) -> bool:
    """A cell that holds something (pandas fills absent cells with None or NaN)."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str | bytes) and len(value) == 0)


def inference_options(params: Mapping[str, Any] | None) -> InferenceOptions:
    params = params or {}
    tta = bool(params.get("tta", False))
    overlap = float(params.get("overlap", InferenceOptions().overlap))
    try:
        return InferenceOptions(overlap=overlap, mirror_axes=(0, 1, 2) if tta else ())
    except ValueError as err:
        raise BadRequest(f"params: {err}") from None


def classes_json(card: ModelCard, task_id: int) -> str:
    return json.dumps({str(value): name for value, name in sorted(card.tasks[task_id].labels.items())})


def example_input(card: ModelCard) -> tuple[Any, dict[str, Any]]:
    """The input example logged with the model: a small noise scan of the first task, as bytes
    (a DataFrame: MLflow writes it as `dataframe_split`, whose binary cells it decodes from base64)."""
    import nibabel as nib
    import pandas as pd

    from pipeline.common.nifti import to_bytes

    task = card.tasks[0]
    z, y, x = task.target_spacing
    shape = EXAMPLE_SHAPE + ((task.in_channels,) if task.in_channels > 1 else ())
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    image = nib.Nifti1Image(data, np.diag([x, y, z, 1.0]))
    return pd.DataFrame({"task": [task.name], "image": [to_bytes(image)]}), {"tta": False}
