"""The model card of an imported reference model, and where each of its facts came from.

A reference checkpoint knows its network (tensor shapes) and its plans (patch size, one target
spacing, perhaps normalisation schemes); it does not know its tasks' names, labels, modalities or
per-task spacing, which the reference keeps in its trainer's code. Those come from a small YAML
file (configs/import_reference.yaml holds the reference's published values). Each fact of the
card is recorded with its source: "checkpoint" (tensor shapes), "plans" (the .model.pkl),
"reference code" (what the plans' preprocessor does) or the YAML file's path.

Normalisation of a channel: where the plans name the task's modality for that channel index and a
scheme for it, nnU-Net v1's "CT" gives ct-clip-zscore with the plans' intensity statistics
(GenericPreprocessor), or the fixed window [-325, 325] HU when the plans name the reference's
DoDNetPreprocessor (it ignores the statistics). Everything else (the reference's merged plans have
no schemes and no statistics) takes the YAML's entry for the channel's modality.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.reference_layout import ReferenceNetwork
from pipeline.common.intensity import ChannelNormalization, ct_window
from pipeline.common.model_card import ModelCard, TaskCard

CHECKPOINT, PLANS, REFERENCE_CODE = "checkpoint", "plans", "reference code"
DODNET_PREPROCESSOR = "DoDNetPreprocessor"  # the reference's: fixed CT window, z-score otherwise


class FactsError(ValueError):
    """A facts file, or facts that do not fit the checkpoint; one line per problem, naming the file."""


class _Normalization(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scheme: str
    lower: float | None = None
    upper: float | None = None
    mean: float | None = None
    std: float | None = None


class _Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    labels: dict[int, str]
    modalities: list[str] = Field(min_length=1)
    target_spacing: tuple[float, float, float] | None = None
    normalization: list[_Normalization] | None = None  # one per channel; else by modality (plans, then the table)
    image_order: int = Field(default=3, ge=0, le=5)
    reference_name: str | None = None


class _Facts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[_Task] = Field(min_length=1)
    normalization: dict[str, _Normalization] = {}


@dataclass(frozen=True)
class Facts:
    """The facts file, validated: tasks in the reference's task-id order, normalisation per modality
    and, where a task gives its own, per task and channel."""

    path: Path
    tasks: tuple[_Task, ...]
    normalization: dict[str, ChannelNormalization]
    task_normalization: dict[int, tuple[ChannelNormalization, ...]]


@dataclass(frozen=True)
class Fact:
    key: str
    value: Any
    source: str


def load_facts(path: str | Path) -> Facts:
    """Read and check the facts YAML; FactsError names the file and key of every problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: facts file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        parsed = _Facts.model_validate(raw)
    except yaml.YAMLError as err:
        raise FactsError(f"{path}: not valid YAML: {err}") from None
    except ValidationError as err:
        raise FactsError("\n".join(f"{path}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                   for e in err.errors(include_url=False))) from None
    problems = []
    task_norms: dict[int, tuple[ChannelNormalization, ...]] = {}
    for i, task in enumerate(parsed.tasks):
        if sorted(task.labels) != list(range(len(task.labels))) or len(task.labels) < 2:
            problems.append(f"{path}: tasks.{i}.labels: need ids 0..n-1 (background 0 and at least one class), "
                            f"got {sorted(task.labels)}")
        if task.normalization is not None:
            if len(task.normalization) != len(task.modalities):
                problems.append(f"{path}: tasks.{i}.normalization: {len(task.normalization)} given for "
                                f"{len(task.modalities)} channel(s)")
            try:
                task_norms[i] = tuple(_channel_normalization(n) for n in task.normalization)
            except ValueError as err:
                problems.append(f"{path}: tasks.{i}.normalization: {err}")
            continue
        unknown = sorted({m for m in task.modalities if m not in parsed.normalization})
        if unknown:
            problems.append(f"{path}: tasks.{i}.modalities: {', '.join(unknown)} not in normalization "
                            f"(it has {', '.join(parsed.normalization) or 'none'}), and the task gives none")
    names = [t.name for t in parsed.tasks]
    problems += [f"{path}: tasks: name {n!r} given twice" for n in sorted({n for n in names if names.count(n) > 1})]
    norms = {}
    for modality, norm in parsed.normalization.items():
        try:
            norms[modality] = _channel_normalization(norm)
        except ValueError as err:
            problems.append(f"{path}: normalization.{modality}: {err}")
    if problems:
        raise FactsError("\n".join(problems))
    return Facts(path=path, tasks=tuple(parsed.tasks), normalization=norms, task_normalization=task_norms)


def _channel_normalization(raw: _Normalization) -> ChannelNormalization:
    values = raw.model_dump()
    if raw.scheme == "ct-window":
        if raw.lower is None or raw.upper is None or raw.lower >= raw.upper:
            raise ValueError("ct-window needs lower < upper")
    elif raw.scheme == "ct-clip-zscore":
        if None in (raw.lower, raw.upper, raw.mean, raw.std):
            raise ValueError("ct-clip-zscore needs lower, upper, mean and std")
    elif raw.scheme != "zscore":
        raise ValueError(f"unknown scheme {raw.scheme!r} (ct-window, ct-clip-zscore or zscore)")
    return ChannelNormalization(**values)


def build_card(network: ReferenceNetwork, plans: Mapping[str, Any], stage_plans: Mapping[str, Any],
               facts: Facts, metadata: Mapping[str, Any]) -> tuple[ModelCard, list[Fact]]:
    """The card of the imported model and the list of its facts with their sources."""
    source = str(facts.path)
    if len(facts.tasks) != network.num_tasks:
        raise FactsError(f"{source}: tasks: {len(facts.tasks)} given, but the checkpoint's prompt has "
                         f"{network.num_tasks} (one per task, in task-id order)")
    problems = []
    for i, task in enumerate(facts.tasks):
        if len(task.labels) > network.max_classes:
            problems.append(f"{source}: tasks.{i}.labels: {len(task.labels)} classes, but the checkpoint's head "
                            f"has {network.max_classes} outputs")
        if len(task.modalities) not in network.stems:
            problems.append(f"{source}: tasks.{i}.modalities: {len(task.modalities)} channel(s), but the checkpoint "
                            f"has first convolutions for {', '.join(map(str, network.stems))} channel(s) only")
    if problems:
        raise FactsError("\n".join(problems))

    facts_out = [Fact("network (features, kernels, strides, FUSE width, prompt, tasks, head, stems)",
                      _network_summary(network), CHECKPOINT),
                 Fact("patch_size", list(network.spec.patch_size), PLANS)]
    plan_spacing = _plans_spacing(stage_plans)
    tasks = []
    for i, task in enumerate(facts.tasks):
        if task.target_spacing is not None:
            spacing, spacing_source = tuple(float(s) for s in task.target_spacing), source
        elif plan_spacing is not None:
            spacing, spacing_source = plan_spacing, PLANS
        else:
            raise FactsError(f"{source}: tasks.{i}.target_spacing: not given, and the plans have no current_spacing")
        if i in facts.task_normalization:
            norms, norm_sources = facts.task_normalization[i], (source,) * len(task.modalities)
        else:
            norms, norm_sources = zip(*(_normalization(c, m, plans, facts) for c, m in enumerate(task.modalities)))
        tasks.append(TaskCard(name=task.name, labels=dict(task.labels), modalities=tuple(task.modalities),
                              target_spacing=spacing,  # type: ignore[arg-type]
                              normalization=tuple(n.to_dict() for n in norms), image_order=task.image_order))
        facts_out += [
            Fact(f"tasks.{i}.name, labels, modalities", f"{task.name}: {len(task.labels)} classes, "
                 f"{', '.join(task.modalities)}", source),
            Fact(f"tasks.{i}.target_spacing", list(spacing), spacing_source),
            *(Fact(f"tasks.{i}.normalization.{c}", n.to_dict(), s) for c, (n, s) in enumerate(zip(norms, norm_sources))),
        ]
    card = ModelCard(spec=network.spec, tasks=tuple(tasks),
                     metadata={**metadata, "facts": {f.key: f.source for f in facts_out}})
    return card, facts_out


def _network_summary(network: ReferenceNetwork) -> str:
    spec = network.spec
    return (f"features {list(spec.features)}, kernels {[list(k) for k in spec.kernels]}, strides "
            f"{[list(s) for s in spec.strides]}, FUSE {spec.fuse_channels}, prompt {list(spec.resolved_prompt_size)}, "
            f"{network.num_tasks} tasks, {network.max_classes} outputs, stems for {list(network.stems)} channel(s)")


def _plans_spacing(stage_plans: Mapping[str, Any]) -> tuple[float, float, float] | None:
    spacing = stage_plans.get("current_spacing")
    if spacing is None or len(spacing) != 3:
        return None
    return tuple(float(s) for s in spacing)  # type: ignore[return-value]


def _normalization(channel: int, modality: str, plans: Mapping[str, Any],
                   facts: Facts) -> tuple[ChannelNormalization, str]:
    """A channel's normalisation and its source (module docstring)."""
    schemes = plans.get("normalization_schemes")
    stats = (plans.get("dataset_properties") or {}).get("intensityproperties")
    preprocessor = plans.get("preprocessor_name")
    modalities = plans.get("modalities")
    # Plans name one scheme per channel index; they speak for this task only where they name its modality
    # (the reference's merged plans list several modalities per channel and no schemes).
    same_modality = isinstance(modalities, Mapping) and modalities.get(channel) == modality
    scheme = schemes.get(channel) if isinstance(schemes, Mapping) and same_modality else None
    if scheme == "CT" and preprocessor == DODNET_PREPROCESSOR:
        return ct_window(), f"{REFERENCE_CODE} ({DODNET_PREPROCESSOR}, named in the plans)"
    if scheme == "CT" and isinstance(stats, Mapping) and channel in stats:
        s = stats[channel]
        return ChannelNormalization("ct-clip-zscore", lower=float(s["percentile_00_5"]),
                                    upper=float(s["percentile_99_5"]), mean=float(s["mean"]),
                                    std=float(s["sd"])), PLANS
    return facts.normalization[modality], str(facts.path)


def describe(facts: Sequence[Fact]) -> list[str]:
    """One line per fact: `key = value  [source]`."""
    return [f"{f.key} = {f.value}  [{f.source}]" for f in facts]
