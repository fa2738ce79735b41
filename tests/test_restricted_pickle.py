"""A pickle from outside is read without running its code: plans-like data loads, anything else is
refused before it is built."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from pipeline.common.restricted_pickle import RefusedPickle, load_restricted


def test_plans_like_data_loads(tmp_path: Path) -> None:
    plans = {"plans_per_stage": OrderedDict({0: {"patch_size": np.array([64, 192, 192]),
                                                 "current_spacing": np.array([3.0, 1.5, 1.5])}}),
             "normalization_schemes": OrderedDict({0: "CT"}), "use_mask_for_norm": OrderedDict({0: False}),
             "dataset_properties": {"intensityproperties": {0: {"mean": np.float64(96.5), "sd": 34.2}}},
             "num_classes": 3, "all_classes": [1, 2], "tasks": ("liver", "kidney"), "folds": {0, 1, 2}}
    path = tmp_path / "model_final_checkpoint.model.pkl"
    path.write_bytes(pickle.dumps({"init": ("plans", 0), "plans": plans}, protocol=pickle.HIGHEST_PROTOCOL))
    loaded = load_restricted(path)["plans"]
    np.testing.assert_array_equal(loaded["plans_per_stage"][0]["patch_size"], [64, 192, 192])
    assert loaded["dataset_properties"]["intensityproperties"][0]["mean"] == 96.5
    assert isinstance(loaded["normalization_schemes"], OrderedDict) and loaded["tasks"] == ("liver", "kidney")
    assert loaded["folds"] == {0, 1, 2}


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_asks_for_code_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.model.pkl"
    path.write_bytes(pickle.dumps({"plans": {}, "x": _Payload(marker)}))
    with pytest.raises(RefusedPickle) as refused:
        load_restricted(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: refused to load ") and "system" in message and "\n" not in message
    assert not marker.exists()
