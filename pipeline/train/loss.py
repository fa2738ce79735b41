"""Dice + cross-entropy with deep supervision (nnU-Net's DC_and_CE, as UniSeg trains).

Logits come from a universal network: `max_classes` channels, channels a sample's task lacks
already at MASKED_LOGIT, so softmax and cross-entropy over all channels are the task's own.
Dice is averaged only over each sample's real foreground classes; with `batch_dice` the
true/false positive counts are pooled over the samples of the same task (never across tasks,
whose class indices mean different things). Loss = CE + (1 - Dice), so a perfect prediction
scores 0.

Under DDP (a torch.distributed process group of more than one rank) the batch Dice pools the
samples of every rank, as nnU-Net does: each rank's per-sample tp/fp/fn are all-gathered with a
gradient-carrying all-gather, so every rank computes the same Dice of the global batch, and
after DDP averages the gradients each rank's logits get exactly the gradient of that global
Dice. Every rank must therefore compute the loss in the same step, as DDP already requires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

SMOOTH = 1e-5


def deep_supervision_weights(levels: int) -> list[float]:
    """1/2^i per level, the lowest resolution off, normalised ([0.533, 0.267, 0.133, 0.067, 0])."""
    if levels < 1:
        raise ValueError(f"need at least one output level, got {levels}")
    if levels == 1:
        return [1.0]
    weights = [0.5**i for i in range(levels)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def soft_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    num_classes: torch.Tensor,
    task_ids: torch.Tensor,
    batch_dice: bool = True,
) -> torch.Tensor:
    """Mean soft Dice over valid (task or sample, foreground class) pairs.

    logits (B, K, Z, Y, X), target (B, Z, Y, X) int, num_classes and task_ids (B,).
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, logits.ndim))
    tp = (probs * onehot).sum(dims)
    fp = (probs * (1 - onehot)).sum(dims)
    fn = ((1 - probs) * onehot).sum(dims)
    if batch_dice and _distributed():
        tp, fp, fn = GatherWithGradient.apply(torch.stack((tp, fp, fn))).unbind(0)
        task_ids, num_classes = all_gather(torch.stack((task_ids, num_classes))).transpose(0, 1).flatten(1)
    classes = torch.arange(logits.shape[1], device=logits.device)
    valid = (classes[None] >= 1) & (classes[None] < num_classes[:, None])
    if batch_dice:
        groups, index = torch.unique(task_ids, return_inverse=True)
        pooled = [torch.zeros(len(groups), logits.shape[1], device=logits.device).index_add(0, index, t) for t in (tp, fp, fn)]
        tp, fp, fn = pooled
        valid = torch.zeros(len(groups), logits.shape[1], device=logits.device).index_add(0, index, valid.float()) > 0
    dice = (2 * tp + SMOOTH) / (2 * tp + fp + fn + SMOOTH).clamp_min(1e-8)
    return dice[valid].mean()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """(world, *shape): every rank's `tensor`, in rank order (no gradient)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


class GatherWithGradient(torch.autograd.Function):
    """All-gather (S, B, ...) tensors to (S, world * B, ...), ranks concatenated along dim 1.

    Backward sums the incoming gradients over ranks (every rank's loss uses every rank's
    counts) and hands each rank the slice of its own samples; works with any backend.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, local: torch.Tensor) -> torch.Tensor:
        ctx.batch = local.shape[1]
        return torch.cat(all_gather(local).unbind(0), dim=1)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[:, start : start + ctx.batch]


def dice_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    num_classes: torch.Tensor,
    task_ids: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice) at one resolution."""
    ce = F.cross_entropy(logits.float(), target.long())
    return ce + 1 - soft_dice(logits, target, num_classes, task_ids)


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: dict[str, LossFn] = {"dice_ce": dice_ce}


def downsample_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour label map at a deep-supervision output size."""
    if tuple(label.shape[-3:]) == tuple(size):
        return label
    return F.interpolate(label[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(label.dtype)


def deep_supervision_loss(
    outputs: Sequence[torch.Tensor],
    label: torch.Tensor,
    num_classes: torch.Tensor,
    task_ids: torch.Tensor,
    loss: str = "dice_ce",
) -> torch.Tensor:
    """Weighted sum of `loss` over the output levels (highest resolution first)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    weights = deep_supervision_weights(len(outputs))
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for weight, logits in zip(weights, outputs):
        if weight:
            target = downsample_label(label, logits.shape[2:])
            total = total + weight * LOSSES[loss](logits, target, num_classes, task_ids)
    return total
