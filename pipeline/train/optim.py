"""Optimizers and learning-rate schedules by name (UniSeg: SGD Nesterov 0.99, poly 0.9)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from pipeline.common.config import TrainConfig

OptimizerFn = Callable[[Iterable[torch.nn.Parameter], TrainConfig], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFn] = {
    "sgd": lambda params, t: torch.optim.SGD(
        params, lr=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.momentum > 0
    ),
    "adamw": lambda params, t: torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay),
}

LR_SCHEDULES: dict[str, Callable[[TrainConfig, int], float]] = {
    # nnU-Net's PolyLRScheduler, stepped once per epoch.
    "poly": lambda t, epoch: t.learning_rate * (1 - epoch / t.epochs) ** t.poly_exponent,
    "constant": lambda t, epoch: t.learning_rate,
}


def build_optimizer(params: Iterable[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    if train.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {train.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[train.optimizer](params, train)


def set_learning_rate(optimizer: torch.optim.Optimizer, train: TrainConfig, epoch: int) -> float:
    """Set (and return) the learning rate of `epoch` (0-based) on every parameter group."""
    lr = LR_SCHEDULES[train.lr_schedule](train, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
