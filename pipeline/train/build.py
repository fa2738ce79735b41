"""From config and stores to the task table, the network spec and the model card."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from model.presets import PRESETS, preset_spec
from model.spec import NetworkSpec
from model.tasks import TaskSpec, check_task_table
from pipeline.common.config import ExperimentConfig, ModelConfig
from pipeline.common.model_card import ModelCard, TaskCard
from pipeline.common.store import StoreManifest, TaskStore


def open_stores(
    uris: Sequence[str], storage_options: dict[str, Any] | None = None, fold: int | None = None,
    allow_incomplete: bool = False,
) -> list[TaskStore]:
    """Open every store of `data.stores`; the order is the task order of the network. With `fold`,
    each store validates on that cross-validation fold (`data.fold`). A store whose last ingest
    left failed or stale cases is refused unless `allow_incomplete` (`data.allow_incomplete_stores`)."""
    if not uris:
        raise ValueError("data.stores is empty: give the stores written by `python -m pipeline.ingest`")
    stores = [TaskStore.open(uri, storage_options, allow_incomplete=allow_incomplete, fold=fold) for uri in uris]
    for store in stores:
        if not store.case_ids("train"):
            raise ValueError(f"{store.uri}: no training cases")
    check_task_table(task_specs([s.manifest for s in stores]))
    return stores


def task_specs(manifests: Sequence[StoreManifest]) -> list[TaskSpec]:
    return [TaskSpec(m.task_name, m.num_classes, m.num_channels) for m in manifests]


def network_spec(model: ModelConfig, manifests: Sequence[StoreManifest]) -> NetworkSpec:
    """The preset with the config's overrides; a new patch size or feature list re-plans the
    topology with nnU-Net's rule for the median target spacing of the tasks."""
    replan = model.patch_size is not None or model.features is not None
    patch = model.patch_size or PRESETS[model.preset].patch_size
    spacing = tuple(float(s) for s in np.median([m.target_spacing for m in manifests], axis=0)) if replan else None
    return preset_spec(
        model.preset,
        patch_size=patch if replan else None,
        spacing=spacing,
        architecture=model.architecture,
        features=model.features,
        prompt_channels=model.prompt_channels,
        prompt_size=model.prompt_size,
        fuse_channels=model.fuse_channels,
        deep_supervision=model.deep_supervision,
        prompt_last_stage=model.prompt_last_stage,
    )


def model_card(cfg: ExperimentConfig, spec: NetworkSpec, manifests: Sequence[StoreManifest], epoch: int) -> ModelCard:
    """Everything `predict` needs: network spec (patch size included) and the task table."""
    return ModelCard(
        spec=spec,
        tasks=tuple(TaskCard.from_manifest(m) for m in manifests),
        metadata={"run": cfg.name, "epochs_trained": epoch, "stores": list(cfg.data.stores),
                  "patch_size": list(spec.patch_size)}
        | ({"pretrained": cfg.finetune.pretrained, "from_scratch": cfg.finetune.from_scratch}
           if cfg.finetune.pretrained else {}),
    )
