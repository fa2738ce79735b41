"""A self-describing model folder: `model.safetensors` (weights) + `card.json` (everything else).

The card holds the network spec and, per task, what inference needs to turn a raw image into a
label map: classes and label names, channels and modalities, target spacing and the per-channel
normalisation planned at ingest. Loading never unpickles anything.

A fold ensemble is one folder too: one card whose `members` name a weights file per
cross-validation fold (`fold_0.safetensors`, ...); it loads as a `FoldEnsemble`
(pipeline.common.ensemble), optionally with a subset of its folds.

The card records, per task, the ids of the cases each network trained on (`trained_cases`; of an
ensemble, per member), so evaluation never scores a training case, whatever folds the store it
reads has drawn since (`unseen_cases`). Cards written before the field load with it unknown (None).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.presets import build_network
from model.spec import NetworkSpec
from model.tasks import ClassesAndChannels, TaskSpec
from pipeline.common.ensemble import FoldEnsemble

if TYPE_CHECKING:  # the store (zarr, fsspec) is not needed to load or run a model
    from pipeline.common.store import StoreManifest

log = logging.getLogger(__name__)

CARD_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
FOLD_KEY = "fold"  # metadata of a single network trained with data.fold: the fold it held out


@dataclass(frozen=True)
class TaskCard(ClassesAndChannels):
    """One task as the model knows it; `normalization` has one dict per input channel."""

    name: str
    labels: dict[int, str]
    modalities: tuple[str, ...]
    target_spacing: tuple[float, float, float]
    normalization: tuple[dict[str, Any], ...]
    image_order: int = 3  # spline order the store's images were resampled with; predict uses the same

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


TrainedCases = dict[str, tuple[str, ...]]  # task name -> ids of the cases a network trained on


@dataclass(frozen=True)
class Member:
    """One network of a fold ensemble: its weights file in the model folder, its held-out fold and
    the cases it trained on (None: not recorded)."""

    file: str
    fold: int
    trained_cases: TrainedCases | None = None


@dataclass(frozen=True)
class ModelCard:
    spec: NetworkSpec
    tasks: tuple[TaskCard, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = CARD_VERSION
    members: tuple[Member, ...] = ()  # a fold ensemble's networks; empty: one network in WEIGHTS_FILE
    trained_cases: TrainedCases | None = None  # of the single network; an ensemble's are its members'

    @property
    def folds(self) -> tuple[int, ...]:
        return tuple(m.fold for m in self.members)

    @property
    def held_out_folds(self) -> tuple[int, ...]:
        """The cross-validation folds this model's networks held out in training: an ensemble's
        member folds, a single network's `metadata["fold"]` (data.fold), or () for a network
        trained on the stores' default split (fold 0 held out)."""
        if self.members:
            return self.folds
        fold = self.metadata.get(FOLD_KEY)
        return () if fold is None else (int(fold),)

    def cases_trained_on(self, task: str) -> frozenset[str] | None:
        """Ids of the `task` cases any network of this model trained on; None when the card does
        not record them (written before the field)."""
        recorded = [m.trained_cases for m in self.members] if self.members else [self.trained_cases]
        known = [r for r in recorded if r is not None]
        if len(known) < len(recorded):
            return None
        return frozenset(case for r in known for case in r.get(task, ()))

    def select_folds(self, folds: tuple[int, ...] | None) -> ModelCard:
        """The card of the ensemble of `folds` only (None: all); ValueError naming the known folds."""
        if folds is None:
            return self
        if not self.members:
            raise ValueError(f"--folds {','.join(map(str, folds))}: this model is a single network, not a fold ensemble")
        unknown = sorted(set(folds) - set(self.folds))
        if unknown or not folds:
            raise ValueError(f"--folds {','.join(map(str, folds))}: this ensemble has folds "
                             f"{', '.join(map(str, self.folds))}")
        return replace(self, members=tuple(m for m in self.members if m.fold in folds))

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
        if self.trained_cases is not None:
            raw["trained_cases"] = self.trained_cases
        if self.members:
            raw["members"] = [{k: v for k, v in asdict(m).items() if v is not None} for m in self.members]
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
            members=tuple(Member(str(m["file"]), int(m["fold"]), _trained_cases(m.get("trained_cases")))
                          for m in raw.get("members", [])),
            trained_cases=_trained_cases(raw.get("trained_cases")),
        )


def _trained_cases(raw: Mapping[str, Any] | None) -> TrainedCases | None:
    return None if raw is None else {str(task): tuple(map(str, cases)) for task, cases in raw.items()}


def unseen_cases(card: ModelCard, task: str, case_ids: list[str], where: str) -> list[str]:
    """`case_ids` less those the model trained on, which are logged by id (a store re-ingested
    since training may have drawn other folds); all of them, with a warning, when the card does
    not record its training cases. `where` names the store in the log lines."""
    trained = card.cases_trained_on(task)
    if trained is None:
        log.warning("%s: the model card does not record the cases the model trained on (written before "
                    "trained_cases); trusting the store's folds, which may have been drawn anew since", where)
        return case_ids
    seen = [c for c in case_ids if c in trained]
    if seen:
        log.warning("%s: %d case(s) the model trained on, not scored (the store's folds were drawn anew since "
                    "training): %s", where, len(seen), ", ".join(seen))
    return [c for c in case_ids if c not in trained]


def build_from_card(card: ModelCard) -> nn.Module:
    """The network of the card (untrained); a FoldEnsemble of one network per member."""
    if card.members:
        return FoldEnsemble([build_network(card.spec, card.task_specs()) for _ in card.members])
    return build_network(card.spec, card.task_specs())


def save_model_dir(network: nn.Module, card: ModelCard, directory: str | Path) -> Path:
    """Write weights (one file per ensemble member) and card into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    network = unwrap(network)
    if card.members:
        if not isinstance(network, FoldEnsemble) or len(network.members) != len(card.members):
            raise ValueError(f"the card names {len(card.members)} ensemble members; the network is not such an ensemble")
        pairs = [(m.file, net) for m, net in zip(card.members, network.members)]
    else:
        pairs = [(WEIGHTS_FILE, network)]
    for file, net in pairs:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(directory / file))
    (directory / CARD_FILE).write_text(card.to_json())
    return directory


def load_model_dir(
    directory: str | Path, device: str | torch.device = "cpu", folds: tuple[int, ...] | None = None
) -> tuple[nn.Module, ModelCard]:
    """Rebuild the network from its card and load its weights (strictly); of a fold ensemble,
    the members of `folds` (None: all), with the card of that subset."""
    directory = Path(directory)
    if not (directory / CARD_FILE).is_file():
        raise FileNotFoundError(f"{directory}: not a model folder ({CARD_FILE} missing)")
    card = ModelCard.from_json((directory / CARD_FILE).read_text(), source=str(directory / CARD_FILE))
    card = card.select_folds(folds)
    files = [m.file for m in card.members] or [WEIGHTS_FILE]
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: not a model folder ({', '.join(missing)} missing)")
    networks = []
    for file in files:
        network = build_network(card.spec, card.task_specs())
        network.load_state_dict(load_file(str(directory / file)))
        networks.append(network)
    network = FoldEnsemble(networks) if card.members else networks[0]
    return network.to(device).eval(), card


def unwrap(network: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel / torch.compile wrappers."""
    while hasattr(network, "module") or hasattr(network, "_orig_mod"):
        network = getattr(network, "module", None) or network._orig_mod
    return network


def write_ensemble_dir(fold_dirs: Mapping[int, str | Path], directory: str | Path,
                       metadata: Mapping[str, Any] | None = None) -> Path:
    """A fold-ensemble folder from single-network model folders (one per fold, e.g. the folds'
    last checkpoints): their weights as `fold_<k>.safetensors` and one card naming them. The
    folds must agree on network and tasks."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cards = {k: ModelCard.from_json((Path(d) / CARD_FILE).read_text(), source=str(Path(d) / CARD_FILE))
             for k, d in sorted(fold_dirs.items())}
    first = next(iter(cards.values()))
    for fold, card in cards.items():
        if card.members or (card.spec, card.tasks) != (first.spec, first.tasks):
            raise ValueError(f"{fold_dirs[fold]}: fold {fold} is not a single network like the other folds")
    members = tuple(Member(f"fold_{k}.safetensors", k, card.trained_cases) for k, card in cards.items())
    for member in members:
        shutil.copyfile(Path(fold_dirs[member.fold]) / WEIGHTS_FILE, directory / member.file)
    kept = {k: v for k, v in first.metadata.items() if k != FOLD_KEY}  # the members name their folds
    card = replace(first, members=members, metadata={**kept, **(metadata or {})}, trained_cases=None)
    (directory / CARD_FILE).write_text(card.to_json())
    return directory
