"""A self-describing model folder: `model.safetensors` (weights) + `card.json` (everything else).

The card holds the network spec and, per task, what inference needs to turn a raw image into a
label map: classes and label names, channels and modalities, target spacing and the per-channel
normalisation planned at ingest. Loading never unpickles anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.presets import build_network
from model.spec import NetworkSpec
from model.tasks import TaskSpec
from pipeline.common.store import StoreManifest

CARD_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"


@dataclass(frozen=True)
class TaskCard:
    """One task as the model knows it; `normalization` has one dict per input channel."""

    name: str
    labels: dict[int, str]
    modalities: tuple[str, ...]
    target_spacing: tuple[float, float, float]
    normalization: tuple[dict[str, Any], ...]
    image_order: int = 3  # spline order the store's images were resampled with; predict uses the same

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return len(self.modalities)

    def task_spec(self) -> TaskSpec:
        return TaskSpec(self.name, self.num_classes, self.in_channels)

    @classmethod
    def from_manifest(cls, manifest: StoreManifest) -> TaskCard:
        """The task as its Zarr store describes it (what ingest did to its images)."""
        return cls(
            name=manifest.task_name,
            labels=dict(manifest.labels),
            modalities=tuple(manifest.modalities),
            target_spacing=tuple(float(s) for s in manifest.target_spacing),  # type: ignore[arg-type]
            normalization=tuple(n.to_dict() for n in manifest.normalization),
            image_order=manifest.image_order,
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TaskCard:
        return cls(
            name=raw["name"],
            labels={int(k): v for k, v in raw["labels"].items()},
            modalities=tuple(raw["modalities"]),
            target_spacing=tuple(raw["target_spacing"]),  # type: ignore[arg-type]
            normalization=tuple(raw["normalization"]),
            image_order=int(raw.get("image_order", 3)),  # cards written before the field: ingest's default
        )


@dataclass(frozen=True)
class ModelCard:
    spec: NetworkSpec
    tasks: tuple[TaskCard, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = CARD_VERSION

    def task_specs(self) -> list[TaskSpec]:
        return [t.task_spec() for t in self.tasks]

    def task_index(self, name: str) -> int:
        names = [t.name for t in self.tasks]
        if name not in names:
            raise ValueError(f"unknown task {name!r}; this model knows {', '.join(names)}")
        return names.index(name)

    def to_json(self) -> str:
        raw = {"version": self.version, "spec": self.spec.to_dict(), "tasks": [asdict(t) for t in self.tasks]}
        raw["metadata"] = self.metadata
        return json.dumps(raw, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "card.json") -> ModelCard:
        raw = json.loads(text)
        if raw.get("version") != CARD_VERSION:
            raise ValueError(f"{source}: model card version {raw.get('version')!r} is not supported (expected {CARD_VERSION})")
        return cls(
            spec=NetworkSpec.from_dict(raw["spec"]),
            tasks=tuple(TaskCard.from_dict(t) for t in raw["tasks"]),
            metadata=raw.get("metadata", {}),
        )


def build_from_card(card: ModelCard) -> nn.Module:
    return build_network(card.spec, card.task_specs())


def save_model_dir(network: nn.Module, card: ModelCard, directory: str | Path) -> Path:
    """Write weights and card into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(network).state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CARD_FILE).write_text(card.to_json())
    return directory


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild the network from its card and load its weights (strictly)."""
    directory = Path(directory)
    for name in (CARD_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: not a model folder ({name} missing)")
    card = ModelCard.from_json((directory / CARD_FILE).read_text(), source=str(directory / CARD_FILE))
    network = build_from_card(card)
    network.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return network.to(device).eval(), card


def unwrap(network: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel / torch.compile wrappers."""
    while hasattr(network, "module") or hasattr(network, "_orig_mod"):
        network = getattr(network, "module", None) or network._orig_mod
    return network

