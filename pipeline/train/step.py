"""One optimizer step: forward under autocast, Dice+CE with deep supervision, scaled backward,
gradient clipping, step. Free of Ray, so GPU tests and benchmarks can run it on its own."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.train.data import Batch
from pipeline.train.loss import deep_supervision_loss


def train_step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               device: torch.device, amp: bool, loss_name: str, grad_clip: float) -> torch.Tensor:
    """One optimizer step on one batch; returns the detached loss.

    With `amp` the forward pass runs under autocast (float16 on CUDA) and the loss is scaled by
    `scaler`; gradients are unscaled before clipping, so `grad_clip` is in true units.
    """
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    num_classes = batch["num_classes"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, enabled=amp):
        outputs = model(image, batch["task"])
    loss = deep_supervision_loss(outputs, label, num_classes, batch["task"].to(device), loss_name)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()
