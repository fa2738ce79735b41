"""One optimizer step: forward under autocast, Dice+CE with deep supervision, scaled backward,
gradient clipping, step. Free of Ray, so GPU tests and benchmarks can run it on its own."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.train.data import Batch
from pipeline.train.execution import Precision
from pipeline.train.loss import deep_supervision_loss


def train_step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               device: torch.device, amp: Precision, loss_name: str, grad_clip: float,
               memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """One optimizer step on one batch; returns the detached loss.

    The forward pass runs under autocast to `amp.dtype` (none for fp32) and the loss is scaled by
    `scaler` (enabled for fp16 only, `Precision.scaler`); gradients are unscaled before clipping,
    so `grad_clip` is in true units. The image is laid out in `memory_format` on the device
    (channels-last 3D to match a channels-last network; by default it keeps its layout).
    """
    image = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
    label = batch["label"].to(device, non_blocking=True)
    num_classes = batch["num_classes"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.autocast):
        outputs = model(image, batch["task"])
    loss = deep_supervision_loss(outputs, label, num_classes, batch["task"].to(device), loss_name)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()
