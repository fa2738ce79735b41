"""Training checkpoints: a model folder (weights + card) plus `train_state.pt`.

`train_state.pt` holds what resuming needs besides the weights: the next epoch, optimizer and
AMP scaler state, the task sampler's state, the metric history and torch's CPU and CUDA RNG
states. It holds only tensors and plain Python values and is read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.common.model_card import WEIGHTS_FILE, ModelCard, save_model_dir, unwrap

STATE_FILE = "train_state.pt"


@dataclass
class TrainState:
    """What a checkpoint restores besides the network weights."""

    epoch: int = 0  # the next epoch to run
    optimizer: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    torch_rng: torch.Tensor | None = None
    cuda_rng: list[torch.Tensor] | None = None  # one state per visible CUDA device

    def capture_rng(self) -> None:
        """Record the CPU RNG and, when CUDA is available, every device's RNG."""
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore_rng(self) -> None:
        """Set the RNGs recorded by `capture_rng`; CUDA states only onto as many devices as were saved."""
        if self.torch_rng is not None:
            torch.set_rng_state(self.torch_rng.cpu())
        if self.cuda_rng and torch.cuda.is_available():
            for device, rng in enumerate(self.cuda_rng[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng.cpu(), device)


def save_checkpoint(directory: str | Path, network: nn.Module, card: ModelCard, state: TrainState) -> Path:
    directory = save_model_dir(network, card, directory)
    torch.save(state.__dict__, directory / STATE_FILE)
    return directory


def load_checkpoint(directory: str | Path, network: nn.Module, device: torch.device | str = "cpu") -> TrainState:
    """Load the weights into `network` (strictly) and return the rest of the state."""
    directory = Path(directory)
    for name in (WEIGHTS_FILE, STATE_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: not a training checkpoint ({name} missing)")
    unwrap(network).load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=str(device)))
    raw = torch.load(directory / STATE_FILE, map_location=device, weights_only=True)
    return TrainState(**raw)
