"""MLflow "models from code" entry: the registered model as an `mlflow.pyfunc` model.

MLflow runs this file when the model is loaded, so nothing is unpickled. Input: a dict with
`task`, a task name, and `image`, either
- a preprocessed (C, Z, Y, X) float array: output is the label map (Z, Y, X) on that grid, or
- the path of a raw NIfTI (3D, or 4D with channels last), or a list of paths (one 3D file per
  channel): the image is preprocessed as the task's card says and the output is the label map
  (x, y, z) on the file's own voxel grid (save it with the file's affine).
Output dtype: uint8. A fold ensemble averages its folds' softmax; load it with
`model_config={"folds": [0, 2]}` to use a subset of the folds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import nibabel as nib
import numpy as np
import torch

from pipeline.common.geometry import nifti_channels
from pipeline.common.inference import predict_scan, segment
from pipeline.common.model_card import load_model_dir


class UniSegModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        folds = (context.model_config or {}).get("folds")
        self.network, self.card = load_model_dir(context.artifacts["model_dir"],
                                                 folds=None if folds is None else tuple(int(f) for f in folds))

    # Unannotated on purpose: MLflow turns type hints of predict into a (list-based) signature.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        task_id = self.card.task_index(model_input["task"])
        image = model_input["image"]
        if isinstance(image, str | Path | list | tuple):
            paths = [image] if isinstance(image, str | Path) else image
            raw, affine = nifti_channels([nib.load(p) for p in paths])
            return predict_scan(self.network, self.card, task_id, raw, affine).labels
        task = self.card.tasks[task_id]
        volume = torch.as_tensor(np.asarray(image, dtype=np.float32))
        return segment(self.network, volume, task_id, task.num_classes, self.card.spec.patch_size).numpy()


mlflow.models.set_model(UniSegModel())
