"""Fine-tuning a trained universal model on a new task: transfer, parameter groups, schedule.

`finetune.pretrained` names the source model. Every worker builds the same network: a plain
U-Net with the source's encoder-decoder (`model.transfer`), the matching weights loaded (or none
with `finetune.from_scratch`, the baseline with the same architecture). Parameters are grouped
by depth for layer-wise learning-rate decay: the heads get the full rate, each layer towards the
input `layer_decay` times the rate of the one after it. Each epoch `apply_schedule` sets every
group's rate (schedule x warm-up x depth scale; 0 for a frozen encoder) and `freeze_encoder`
freezes the encoder during the first `freeze_encoder_epochs` (no gradients, so momentum and weight
decay leave it alone). DDP syncs only the parameters that required gradients when it wrapped the
network, so the training loop freezes before wrapping and wraps again when the encoder thaws.

With `finetune.add_task` the pretrained UniSeg keeps its architecture and gains the stores' tasks
after its own (`extended_network`, `model.universal.add_tasks`): only the new elements train
(`freeze_old_elements`), so the old tasks predict as before.

`python -m pipeline.finetune` checks and pins its config with `pin_pretrained`, then trains it with
`pipeline.train.run`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
from torch import nn

from model.spec import NetworkSpec
from model.transfer import transfer_to_single_task
from model.unet import PlainUNet
from model.universal import UniSeg, add_tasks
from pipeline.common.config import (
    ConfigError, ExperimentConfig, FinetuneConfig, TrainConfig, config_from_dict, to_dict,
)
from pipeline.common.mlflow_model import load_model, pin_model_uri
from pipeline.common.model_card import ModelCard
from pipeline.common.store import StoreManifest
from pipeline.common.tracking import check_tracking_server, resolve_tracking_uri
from pipeline.train.build import open_stores, task_specs
from pipeline.train.optim import OPTIMIZERS

log = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."


def pin_pretrained(cfg: ExperimentConfig) -> ExperimentConfig:
    """The fine-tuning run's config, checked before Ray starts: an absolute tracking URI and the
    pretrained model's URI pinned (`models:/NAME@ALIAS` -> `models:/NAME/VERSION`, so every worker
    and a resumed run load the same weights), the model loaded once (a wrong URI fails here) and,
    with `add_task`, the stores' tasks checked against it."""
    if not cfg.finetune.pretrained:
        raise ConfigError("finetune.pretrained: give the model to start from (--pretrained models:/NAME@ALIAS)")
    if cfg.finetune.add_task and cfg.finetune.from_scratch:
        raise ConfigError("finetune: add_task keeps the pretrained weights; it cannot go with from_scratch")
    if len(cfg.data.stores) != 1 and not cfg.finetune.add_task:
        raise ConfigError(f"data.stores: fine-tuning trains one new task, got {len(cfg.data.stores)} stores")
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    check_tracking_server(tracking_uri, cfg.mlflow)
    pinned = pin_model_uri(cfg.finetune.pretrained, tracking_uri)
    _, card = load_model(pinned, tracking_uri=tracking_uri)
    if cfg.finetune.add_task:
        try:
            check_addition(cfg.finetune.pretrained, card, [s.manifest for s in open_stores(cfg.data.stores)])
        except ValueError as err:
            raise ConfigError(str(err)) from None
    log.info("pretrained %s (%s): %s, tasks %s", cfg.finetune.pretrained, pinned, card.spec.architecture,
             ", ".join(t.name for t in card.tasks))
    raw = to_dict(cfg)
    raw["mlflow"]["tracking_uri"] = tracking_uri
    raw["finetune"]["pretrained"] = pinned
    return config_from_dict(raw, source="finetune")


def transferred_network(cfg: ExperimentConfig, manifests: Sequence[StoreManifest]) -> tuple[NetworkSpec, PlainUNet]:
    """The spec and network for fine-tuning `cfg.finetune.pretrained` on the one task of the stores."""
    if len(manifests) != 1:
        raise ValueError(f"fine-tuning trains one new task, got {len(manifests)} stores in data.stores")
    task = manifests[0]
    source, card = load_model(cfg.finetune.pretrained, tracking_uri=cfg.mlflow.tracking_uri)  # type: ignore[arg-type]
    spec = card.spec.replace(architecture="plain")
    if cfg.finetune.from_scratch:
        network = PlainUNet(spec, task.in_channels, task.num_classes)
        log.info("from scratch: %s architecture of %s, random weights", spec.architecture, cfg.finetune.pretrained)
        return spec, network
    network, report = transfer_to_single_task(source.state_dict(), card.spec, task.in_channels, task.num_classes)
    log.info("%s from %s", report.summary(), cfg.finetune.pretrained)
    return spec, network


def transfers(cfg: ExperimentConfig) -> bool:
    """Whether the run transfers a pretrained model to a single-task U-Net (fine-tuning's schedule
    and layer-wise groups apply), as opposed to training from scratch or adding tasks."""
    return bool(cfg.finetune.pretrained) and not cfg.finetune.add_task


def extended_network(
    cfg: ExperimentConfig, manifests: Sequence[StoreManifest]
) -> tuple[NetworkSpec, UniSeg, ModelCard, dict[str, torch.Tensor]]:
    """The pretrained UniSeg with the stores' tasks added after its own, only their new elements
    trainable; returns its spec, the network, the pretrained model's card and the masks of the
    new elements (`model.universal.add_tasks`)."""
    source, card = load_model(cfg.finetune.pretrained, tracking_uri=cfg.mlflow.tracking_uri)  # type: ignore[arg-type]
    check_addition(cfg.finetune.pretrained, card, manifests)  # type: ignore[arg-type]
    network, new_elements = add_tasks(source, task_specs(manifests))  # type: ignore[arg-type]
    freeze_old_elements(network, new_elements)
    log.info("added %s to %s (%d tasks before); %d of %d weights train", ", ".join(m.task_name for m in manifests),
             cfg.finetune.pretrained, len(card.tasks), sum(int(m.sum()) for m in new_elements.values()),
             sum(m.numel() for m in new_elements.values()))
    return card.spec, network, card, new_elements


def check_addition(uri: str, card: ModelCard, manifests: Sequence[StoreManifest]) -> None:
    """Tasks can be added to a UniSeg model, under names it does not have; one line per problem."""
    problems = []
    if card.spec.architecture != "uniseg":
        problems.append(f"{uri}: adding a task needs a UniSeg model, this one is {card.spec.architecture}")
    problems += [f"{uri} already has task {m.task_name} (store {m.dataset or m.task_name})"
                 for m in manifests if m.task_name in {t.name for t in card.tasks}]
    if problems:
        raise ValueError("\n".join(problems))


def freeze_old_elements(network: nn.Module, new_elements: dict[str, torch.Tensor]) -> None:
    """Gradients only for the new elements: off for a parameter without any, masked for one with
    some. Weight decay would still move the old elements: `keep_old_elements` puts them back."""
    for name, param in network.named_parameters():
        mask = new_elements[name]
        if not mask.any():
            param.requires_grad_(False)
        elif not mask.all():
            param.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device))


def keep_old_elements(optimizer: torch.optim.Optimizer, network: nn.Module,
                      new_elements: dict[str, torch.Tensor]) -> None:
    """After every optimizer step, reset the old elements of partly new parameters to their values now."""
    kept = [(param, mask.to(param.device), param.detach().clone()) for name, param in network.named_parameters()
            if (mask := new_elements[name]).any() and not mask.all()]

    def restore(*_: object) -> None:
        with torch.no_grad():
            for param, mask, old in kept:
                param.copy_(torch.where(mask, param, old))

    optimizer.register_step_post_hook(restore)


def layer_ids(names: Sequence[str]) -> dict[str, int]:
    """Depth of each parameter from the input: stem 0, encoder stage i -> i+1, then the decoder
    levels from the bottleneck up, then the heads (the deepest id)."""
    encoder_stages = 1 + max((int(m.group(1)) for n in names if (m := re.match(r"encoder\.stages\.(\d+)\.", n))),
                             default=-1)
    decoder_levels = 1 + max((int(m.group(1)) for n in names
                              if (m := re.match(r"decoder\.(?:upsample|stages)\.(\d+)", n))), default=-1)
    ids = {}
    for name in names:
        if m := re.match(r"encoder\.stages\.(\d+)\.", name):
            ids[name] = int(m.group(1)) + 1
        elif name.startswith(ENCODER_PREFIX):
            ids[name] = 0
        elif m := re.match(r"decoder\.(?:upsample|stages)\.(\d+)", name):
            ids[name] = encoder_stages + 1 + int(m.group(1))
        else:  # heads and anything task-specific: trained at the full rate
            ids[name] = encoder_stages + 1 + decoder_levels
    return ids


def build_finetune_optimizer(network: nn.Module, train: TrainConfig, finetune: FinetuneConfig) -> torch.optim.Optimizer:
    """The configured optimizer over one parameter group per depth, each with its `lr_scale`."""
    named = list(network.named_parameters())
    ids = layer_ids([n for n, _ in named])
    top = max(ids.values())
    groups: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, param in named:
        groups.setdefault(ids[name], []).append((name, param))
    param_groups = [
        {"params": [p for _, p in members], "lr_scale": finetune.layer_decay ** (top - depth),
         "encoder": all(n.startswith(ENCODER_PREFIX) for n, _ in members)}
        for depth, members in sorted(groups.items())
    ]
    return OPTIMIZERS[train.optimizer](param_groups, train)


def warmup_factor(finetune: FinetuneConfig, epoch: int) -> float:
    """Linear warm-up: (epoch + 1) / (warmup_epochs + 1) for the first warmup_epochs epochs."""
    if epoch >= finetune.warmup_epochs:
        return 1.0
    return (epoch + 1) / (finetune.warmup_epochs + 1)


def encoder_frozen(finetune: FinetuneConfig, epoch: int) -> bool:
    return epoch < finetune.freeze_encoder_epochs


def apply_schedule(optimizer: torch.optim.Optimizer, finetune: FinetuneConfig, epoch: int, lr: float) -> float:
    """Set each group's rate for `epoch` (schedule `lr` x warm-up x depth scale, 0 for a frozen
    encoder); returns the heads' rate."""
    frozen = encoder_frozen(finetune, epoch)
    factor = warmup_factor(finetune, epoch)
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if frozen and group.get("encoder") else lr * factor * group.get("lr_scale", 1.0)
    return lr * factor


def freeze_encoder(network: nn.Module, finetune: FinetuneConfig, epoch: int) -> bool:
    """Encoder gradients off in the frozen epochs, on after; True when a flag changed. Call it on
    the unwrapped network, then (re)wrap it for DDP."""
    trainable = not encoder_frozen(finetune, epoch)
    encoder = [p for name, p in network.named_parameters() if name.startswith(ENCODER_PREFIX)]
    changed = any(p.requires_grad != trainable for p in encoder)
    for param in encoder:
        param.requires_grad_(trainable)
    return changed
