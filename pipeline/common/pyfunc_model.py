"""MLflow "models from code" entry: the registered model as an `mlflow.pyfunc` model.

MLflow runs this file when the model is loaded, so nothing is unpickled. The model carries its
own code (the `model` and `pipeline` packages, MLflow's `code_paths`) and pinned requirements
(`mlflow_model.py`), so a fresh environment built from those alone loads and serves it.

Input and output: `pyfunc_io.py` (a table of rows: task plus NIfTI bytes, a path or a
preprocessed array; out: the label map as .nii.gz bytes on the scan's own grid, its affine, the
class names). A fold ensemble averages its folds' softmax; load it with
`model_config={"folds": [0, 2]}` to use a subset of the folds; `{"device": "cpu"}` keeps it off
a GPU (default: CUDA when there is one).
"""

from __future__ import annotations

from typing import Any

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline.common.geometry import nifti_channels, volume_problem
from pipeline.common.inference import InferenceOptions, label_map, predict_probabilities, predict_scan, resolve_device
from pipeline.common.model_card import load_model_dir
from pipeline.common.nifti import from_bytes, label_image, to_bytes
from pipeline.common.pyfunc_io import BadRequest, Request, classes_json, inference_options, read_rows


class UniSegModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        config = context.model_config or {}
        folds = config.get("folds")
        self.network, self.card = load_model_dir(context.artifacts["model_dir"],
                                                 device=resolve_device(config.get("device", "auto")),
                                                 folds=None if folds is None else tuple(int(f) for f in folds))

    # Unannotated on purpose: MLflow turns type hints of predict into a (list-based) signature.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        try:
            requests = read_rows(model_input, self.card)
            options = inference_options(params)
            rows = [self._predict(request, options) for request in requests]
        except BadRequest as err:  # HTTP 400 with the message, not 500
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(rows, columns=["task", "labels", "affine", "classes"])

    def _predict(self, request: Request, options: InferenceOptions) -> dict[str, Any]:
        task = self.card.tasks[request.task_id]
        output = {"task": task.name, "classes": classes_json(self.card, request.task_id)}
        if request.source == "array":
            volume = torch.as_tensor(np.asarray(request.value, dtype=np.float32))
            if volume.ndim != 4 or volume.shape[0] != task.in_channels:
                raise BadRequest(f"row {request.row}: array of shape {tuple(volume.shape)}; task {task.name} "
                                 f"takes (C, Z, Y, X) with C = {task.in_channels}")
            labels = label_map(predict_probabilities(self.network, volume, request.task_id, task.num_classes,
                                                     self.card.spec.patch_size, options))
            return output | {"labels": labels.numpy(), "affine": None}
        image = self._read(request)
        raw, affine = nifti_channels([image])
        if raw.shape[0] != task.in_channels:
            raise BadRequest(f"row {request.row}: the scan has {raw.shape[0]} channel(s), task {task.name} "
                             f"takes {task.in_channels} ({', '.join(task.modalities)})")
        if not np.isfinite(raw).all():
            raise BadRequest(f"row {request.row}: the scan holds NaN or infinite values")
        labels = predict_scan(self.network, self.card, request.task_id, raw, affine, options).labels
        return output | {"labels": to_bytes(label_image(labels, affine, image.header)), "affine": affine.tolist()}

    @staticmethod
    def _read(request: Request) -> nib.Nifti1Image:
        try:
            image = from_bytes(request.value) if request.source == "image" else nib.load(str(request.value))
        except (OSError, ValueError) as err:
            what = "image" if request.source == "image" else str(request.value)
            raise BadRequest(f"row {request.row}: {what}: not a readable NIfTI file ({err})") from None
        problem = volume_problem(image.shape, image.affine) if image.ndim in (3, 4) else \
            f"{image.ndim}D image; a 3D scan, or 4D with the channels last"
        if problem:
            raise BadRequest(f"row {request.row}: {problem}")
        return image


mlflow.models.set_model(UniSegModel())
