"""From config and stores to the task table, the network spec and the model card."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from model.presets import PRESETS, planned_spec, preset_spec, replan
from model.spec import NetworkSpec
from model.tasks import TaskSpec, check_task_table
from pipeline.common.config import ExperimentConfig, ModelConfig
from pipeline.common.model_card import FOLD_KEY, ModelCard, TaskCard
from pipeline.common.store import StoreManifest, TaskStore


def open_stores(
    uris: Sequence[str], storage_options: dict[str, Any] | None = None, fold: int | None = None,
    allow_incomplete: bool = False,
) -> list[TaskStore]:
    """Open every store of `data.stores`; the order is the task order of the network. With `fold`,
    each store validates on that cross-validation fold (`data.fold`). A store whose last ingest
    failed or left failed or stale cases is refused unless `allow_incomplete`
    (`data.allow_incomplete_stores`)."""
    if not uris:
        raise ValueError("data.stores is empty: give the stores written by `python -m pipeline.ingest`")
    stores = [TaskStore.open(uri, storage_options, allow_incomplete=allow_incomplete, fold=fold) for uri in uris]
    for store in stores:
        if not store.case_ids("train"):
            raise ValueError(f"{store.uri}: no training cases")
    check_task_table(task_specs([s.manifest for s in stores]))
    return stores


def task_specs(manifests: Sequence[StoreManifest]) -> list[TaskSpec]:
    return [TaskSpec(m.task_name, m.num_classes, m.in_channels) for m in manifests]


def network_spec(
    model: ModelConfig, manifests: Sequence[StoreManifest], median_shapes: Sequence[Sequence[int]] | None = None
) -> NetworkSpec:
    """The network for these tasks, with the config's overrides.

    `model.preset` names a preset; unset, nnU-Net's planner chooses patch, topology and widths
    for the tasks' median target spacing and the median of their median shapes
    (`median_shapes`, one per task, see `task_median_shapes`) within `model.memory_gb`. A new
    patch size or feature list re-plans the topology with nnU-Net's rule for that spacing.
    """
    spacing = tuple(float(s) for s in np.median([m.target_spacing for m in manifests], axis=0))
    overrides = {
        "architecture": model.architecture, "prompt_channels": model.prompt_channels,
        "prompt_size": model.prompt_size, "fuse_channels": model.fuse_channels,
        "deep_supervision": model.deep_supervision, "prompt_last_stage": model.prompt_last_stage,
    }
    replanned = model.patch_size is not None or model.features is not None
    if model.preset is not None:
        patch = model.patch_size or PRESETS[model.preset].patch_size
        return preset_spec(model.preset, patch_size=patch if replanned else None,
                           spacing=spacing if replanned else None, features=model.features, **overrides)
    if not median_shapes:
        raise ValueError("model.preset is not set, so the network is planned from the tasks' median image "
                         "shapes: pass them (pipeline.train.build.task_median_shapes) or name a preset")
    median_shape = tuple(int(n) for n in np.median(np.asarray(median_shapes), axis=0))
    spec = planned_spec(spacing, median_shape, model.memory_gb, **overrides)
    if not replanned:
        return spec
    return replan(spec.replace(features=model.features or spec.features), model.patch_size or spec.patch_size, spacing)


def task_median_shapes(stores: Sequence[TaskStore]) -> list[tuple[int, int, int]]:
    """Per store, the median (z, y, x) shape of its training cases at its target spacing."""
    shapes = []
    for store in stores:
        cases = [store.case_meta(c).shape for c in store.case_ids("train")]
        shapes.append(tuple(int(n) for n in np.median(np.asarray(cases), axis=0)))
    return shapes


def model_card(cfg: ExperimentConfig, spec: NetworkSpec, manifests: Sequence[StoreManifest], epoch: int,
               prior: ModelCard | None = None) -> ModelCard:
    """Everything `predict` needs: network spec (patch size included) and the task table (`prior`'s,
    the pretrained model's when tasks were added to it, then the stores'); with `data.fold`, the
    cross-validation fold held out (`metadata["fold"]`: evaluate's validation split); per task the
    ids of its training cases, `prior`'s for its tasks (evaluation never scores them, whatever the
    store's folds)."""
    prior_tasks = prior.tasks if prior else ()
    prior_cases = {t.name: prior.cases_trained_on(t.name) for t in prior_tasks} if prior else {}
    return ModelCard(
        spec=spec,
        tasks=(*prior_tasks, *(TaskCard.from_manifest(m) for m in manifests)),
        trained_cases={name: tuple(sorted(cases)) for name, cases in prior_cases.items() if cases is not None}
        | {m.task_name: tuple(sorted(m.split["train"])) for m in manifests},
        metadata={"run": cfg.name, "epochs_trained": epoch, "stores": list(cfg.data.stores),
                  "patch_size": list(spec.patch_size)}
        | ({FOLD_KEY: cfg.data.fold} if cfg.data.fold is not None else {})
        | ({"pretrained": cfg.finetune.pretrained, "from_scratch": cfg.finetune.from_scratch,
            "add_task": cfg.finetune.add_task}
           if cfg.finetune.pretrained else {}),
    )
