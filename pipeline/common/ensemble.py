"""A fold ensemble as one network: its output is the log of the members' mean softmax.

Softmax of that output is the members' mean softmax, so everything that takes a network's
logits (sliding window, mirroring TTA, argmax, validation, predict, the pyfunc model) averages
the folds' probabilities without knowing about folds; with TTA, every (fold, mirroring) pair
counts the same, as in nnU-Net's ensembles. Classes a task does not have keep probability 0
(their logits are -1e4 in every member).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import nn

_TINY = torch.finfo(torch.float32).tiny


class FoldEnsemble(nn.Module):
    """Networks of one architecture (one per cross-validation fold), called like one of them;
    returns a one-element list (the full-resolution output, as in eval without deep supervision)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("a fold ensemble needs at least one member network")
        self.members = nn.ModuleList(members)

    def forward(self, image: torch.Tensor, task_ids: object) -> list[torch.Tensor]:
        total = None
        for member in self.members:
            probabilities = torch.softmax(member(image, task_ids)[0].float(), dim=1)
            total = probabilities if total is None else total.add_(probabilities)
        return [torch.log(total.div_(len(self.members)).clamp_min_(_TINY))]


def parse_folds(text: str) -> tuple[int, ...] | None:
    """`--folds` on the command line (an argparse type): "all" (None) or comma-separated fold
    numbers, e.g. "0,2"."""
    if text.strip() == "all":
        return None
    try:
        folds = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        folds = ()
    if not folds or min(folds) < 0:
        raise argparse.ArgumentTypeError(f"must be 'all' or fold numbers >= 0 like 0,1,2, got {text!r}")
    return folds
