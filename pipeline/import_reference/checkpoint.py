"""Read a UniSeg reference checkpoint without running any of its code, and write one.

nnU-Net v1 (which the reference builds on) saves a model as two files:
- `NAME.model`: `torch.save` of a dict: `state_dict` beside `optimizer_state_dict`,
  `lr_scheduler_state_dict`, `epoch`, `plot_stuff` (loss curves as numpy floats), `best_stuff` and
  `amp_grad_scaler`. It is read with `torch.load(weights_only=True)`; the numpy floats of the
  curves are the only globals admitted beyond torch's own (numpy scalars and their dtypes, under
  the numpy 1 and numpy 2 module names).
- `NAME.model.pkl`: a pickle of {"init": the trainer's constructor arguments, "name": its class
  name, "class": str(its class), "plans": the plans dict}. It is read with `load_restricted`
  (builtin containers, OrderedDict, numpy arrays and scalars only); a bare plans dict is accepted too.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.common.restricted_pickle import load_restricted

PLANS_SUFFIX = ".pkl"
_SCALAR = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
_DTYPES = tuple(getattr(np.dtypes, name) for name in (
    "BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType", "UInt16DType",
    "UInt32DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType", "LongDoubleDType"))
# numpy floats in the loss curves: checkpoints written under numpy 1 name the scalar constructor
# numpy.core.multiarray.scalar, under numpy 2 numpy._core.multiarray.scalar.
NUMPY_SCALAR_GLOBALS: list[Any] = [(_SCALAR, "numpy.core.multiarray.scalar"),
                                   (_SCALAR, "numpy._core.multiarray.scalar"), np.dtype, *_DTYPES]


class ReferenceCheckpointError(ValueError):
    """A reference checkpoint that cannot be read; the message names the file."""


@dataclass(frozen=True)
class ReferenceCheckpoint:
    """What import uses from the two files; `other_entries` are the .model's keys left unread."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    epoch: int | None
    plans: dict[str, Any]
    trainer: str | None
    other_entries: tuple[str, ...]

    @property
    def stage_plans(self) -> dict[str, Any]:
        """The plans of the (only, or highest) resolution stage the network was trained at."""
        stages = self.plans.get("plans_per_stage")
        if not isinstance(stages, Mapping) or not stages:
            raise ReferenceCheckpointError(f"{self.plans_path}: plans have no 'plans_per_stage'")
        return dict(stages[max(stages)])

    @property
    def plans_path(self) -> Path:
        return plans_path(self.path)


def plans_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + PLANS_SUFFIX)


def read_checkpoint(path: str | Path) -> ReferenceCheckpoint:
    """The state dict and plans of `path` (`*.model`) and `path`.pkl; no code from either runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference checkpoint not found")
    pkl = plans_path(path)
    if not pkl.is_file():
        raise FileNotFoundError(f"{pkl}: the plans file beside the checkpoint is missing "
                                "(nnU-Net v1 writes NAME.model and NAME.model.pkl)")
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        asked = re.search(r"GLOBAL\s+([\w.]+)", str(err))
        what = asked.group(1) if asked else "something torch's weights-only loader does not admit"
        raise ReferenceCheckpointError(f"{path}: refused to load {what} (only tensors, containers, numbers and "
                                       "numpy floats are read from a checkpoint)") from None
    except (RuntimeError, OSError, EOFError) as err:
        raise ReferenceCheckpointError(f"{path}: not a torch checkpoint ({str(err).splitlines()[0]})") from None
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state_dict"), Mapping):
        raise ReferenceCheckpointError(f"{path}: no 'state_dict' in the checkpoint (an nnU-Net v1 *.model holds one)")
    state = dict(saved["state_dict"])
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReferenceCheckpointError(f"{path}: its state_dict holds something other than tensors")
    info = load_restricted(pkl)
    if not isinstance(info, Mapping):
        raise ReferenceCheckpointError(f"{pkl}: expected a dict (trainer info or plans), got {type(info).__name__}")
    plans = info.get("plans", info)
    if not isinstance(plans, Mapping) or "plans_per_stage" not in plans:
        raise ReferenceCheckpointError(f"{pkl}: no nnU-Net v1 plans in it (no 'plans_per_stage')")
    epoch = saved.get("epoch")
    return ReferenceCheckpoint(
        path=path,
        state_dict=state,
        epoch=int(epoch) if isinstance(epoch, int) else None,
        plans=dict(plans),
        trainer=str(info["name"]) if "name" in info else None,
        other_entries=tuple(sorted(str(k) for k in saved if k != "state_dict")),
    )


def write_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], plans: Mapping[str, Any],
                     epoch: int = 0, trainer: str = "UniSeg_Trainer", init_folder: str | Path | None = None) -> Path:
    """Write `path` (`*.model`) and `path`.pkl as nnU-Net v1 writes them, with what the reference's
    inference reads: the state dict, the epoch, empty curves, and the plans with the trainer's
    name and constructor arguments (its output and dataset folder: `init_folder`, default the
    checkpoint's; the reference's trainer writes a copy of its code there). No optimizer state
    (the reference's loader accepts None for it)."""
    path = Path(path)
    folder = str(Path(init_folder or path.parent).resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "epoch": epoch,
        "state_dict": OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state_dict.items()),
        "optimizer_state_dict": None,
        "lr_scheduler_state_dict": None,
        "plot_stuff": ([], [], [], []),
        "best_stuff": (0, 0.0, 0.0),
    }, path)
    # nnUNetTrainer's init: plans_file, fold, output_folder, dataset_directory, batch_dice, stage,
    # unpack_data, deterministic, fp16
    init = (str(Path(folder) / "plans.pkl"), 0, folder, folder, True, None, True, True, True)
    info = OrderedDict(init=init, name=trainer,
                       **{"class": f"<class 'nnunet.training.network_training.{trainer}.{trainer}'>"},
                       plans=dict(plans))
    plans_path(path).write_bytes(pickle.dumps(info, protocol=pickle.HIGHEST_PROTOCOL))
    return path
