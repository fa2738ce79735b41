"""MLflow "models from code" entry: the registered model as an `mlflow.pyfunc` model.

MLflow runs this file when the model is loaded, so nothing is unpickled. Input: a dict with
`image`, a preprocessed (C, Z, Y, X) float array, and `task`, a task name; output: the label
map (Z, Y, X) as uint8.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

from pipeline.common.inference import segment
from pipeline.common.model_card import load_model_dir


class UniSegModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.network, self.card = load_model_dir(context.artifacts["model_dir"])

    # Unannotated on purpose: MLflow turns type hints of predict into a (list-based) signature.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        task_id = self.card.task_index(model_input["task"])
        image = torch.as_tensor(np.asarray(model_input["image"], dtype=np.float32))
        task = self.card.tasks[task_id]
        return segment(self.network, image, task_id, task.num_classes, self.card.spec.patch_size).numpy()


mlflow.models.set_model(UniSegModel())
