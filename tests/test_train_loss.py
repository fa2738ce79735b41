"""Dice + CE with deep supervision: known answers, masked classes, per-task batch Dice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.universal import MASKED_LOGIT, mask_classes
from pipeline.common.services import free_port
from pipeline.train.loss import deep_supervision_loss, deep_supervision_weights, downsample_label, soft_dice


def _perfect_logits(label: torch.Tensor, classes: int, margin: float = 30.0) -> torch.Tensor:
    return F.one_hot(label, classes).movedim(-1, 1).float() * margin


def _label(batch: int = 2, classes: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (batch, size, size, size), generator=g)


def test_deep_supervision_weights_match_uniseg() -> None:
    assert deep_supervision_weights(5) == pytest.approx([0.5333, 0.2667, 0.1333, 0.0667, 0.0], abs=1e-4)
    assert deep_supervision_weights(1) == [1.0]
    assert sum(deep_supervision_weights(3)) == pytest.approx(1.0)


def test_perfect_prediction_scores_zero() -> None:
    label = _label()
    logits = _perfect_logits(label, 3)
    ids = torch.tensor([0, 0])
    loss = deep_supervision_loss([logits], label, torch.tensor([3, 3]), ids)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


def test_uniform_prediction_has_the_known_cross_entropy() -> None:
    label = _label(classes=2)
    logits = torch.zeros(2, 2, 8, 8, 8)
    dice = soft_dice(logits, label, torch.tensor([2, 2]), torch.tensor([0, 0]))
    fraction = (label == 1).float().mean()
    # p = 0.5 everywhere: tp = 0.5 |G|, fp = 0.5 |not G|, fn = 0.5 |G| -> Dice = |G| / (|G| + N/2)
    assert dice.item() == pytest.approx((fraction / (fraction + 0.5)).item(), rel=1e-4)
    total = deep_supervision_loss([logits], label, torch.tensor([2, 2]), torch.tensor([0, 0]))
    assert total.item() == pytest.approx(torch.log(torch.tensor(2.0)).item() + 1 - dice.item(), rel=1e-4)


def test_masked_classes_do_not_count() -> None:
    """A 2-class task inside a 4-class-wide network scores as if the logits were cropped."""
    label = _label(classes=2)
    logits = torch.randn(2, 4, 8, 8, 8)
    masked = mask_classes(logits, [2, 2])
    assert (masked[:, 2:] == MASKED_LOGIT).all()
    wide = deep_supervision_loss([masked], label, torch.tensor([2, 2]), torch.tensor([1, 1]))
    cropped = deep_supervision_loss([logits[:, :2]], label, torch.tensor([2, 2]), torch.tensor([1, 1]))
    assert wide.item() == pytest.approx(cropped.item(), rel=1e-5)


def test_mixed_batch_pools_dice_per_task_only() -> None:
    label = torch.stack([_label(1, 3, seed=1)[0], _label(1, 2, seed=2)[0]])
    logits = mask_classes(torch.randn(2, 3, 8, 8, 8), [3, 2])
    mixed = soft_dice(logits, label, torch.tensor([3, 2]), torch.tensor([0, 1]))
    first = soft_dice(logits[:1], label[:1], torch.tensor([3]), torch.tensor([0]))  # 2 classes
    second = soft_dice(logits[1:, :2], label[1:], torch.tensor([2]), torch.tensor([1]))  # 1 class
    assert mixed.item() == pytest.approx((2 * first.item() + second.item()) / 3, rel=1e-5)


def test_deep_supervision_downsamples_the_label_and_skips_the_lowest_level() -> None:
    label = _label(size=16)
    outputs = [_perfect_logits(label, 3), torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4)]
    assert downsample_label(label, (8, 8, 8)).shape == (2, 8, 8, 8)
    outputs[1] = _perfect_logits(downsample_label(label, (8, 8, 8)), 3)
    # the lowest level has weight 0, so random logits there change nothing
    assert deep_supervision_loss(outputs, label, torch.tensor([3, 3]), torch.tensor([0, 0])).item() < 1e-3


def test_loss_has_gradients() -> None:
    label = _label()
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    deep_supervision_loss([logits], label, torch.tensor([3, 3]), torch.tensor([0, 0])).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# --- batch Dice gathered over DDP ranks --------------------------------------------------------

WORLD = 2


def _ddp_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A global batch of 4 (2 per rank) mixing a 3-class and a 2-class task across ranks."""
    g = torch.Generator().manual_seed(7)
    tasks = torch.tensor([0, 0, 1, 0])
    num_classes = torch.tensor([3, 3, 2, 3])
    logits = mask_classes(torch.randn(4, 3, 8, 8, 8, generator=g), num_classes.tolist())
    label = torch.stack([torch.randint(0, int(n), (8, 8, 8), generator=g) for n in num_classes])
    return logits, label, num_classes, tasks


def _tiny_network() -> torch.nn.Module:
    from model.presets import build_network, preset_spec
    from model.tasks import TaskSpec

    torch.manual_seed(0)
    spec = preset_spec("tiny", patch_size=(8, 16, 16), spacing=(1.0, 1.0, 1.0))
    return build_network(spec, [TaskSpec("a", 3, 1), TaskSpec("b", 2, 1)])


def _ddp_images() -> torch.Tensor:
    return torch.randn(4, 1, 8, 16, 16, generator=torch.Generator().manual_seed(8))


def _rank_loss(rank: int, port: int, out: str) -> None:
    """One rank: the loss on its half of the logits, then a DDP step of a tiny UniSeg on its half."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mine = slice(2 * rank, 2 * rank + 2)
        logits, label, num_classes, tasks = (t[mine] for t in _ddp_batch())
        logits = logits.clone().requires_grad_()
        dice = soft_dice(logits, label, num_classes, tasks)
        loss = deep_supervision_loss([logits], label, num_classes, tasks)
        loss.backward()
        model = torch.nn.parallel.DistributedDataParallel(_tiny_network(), find_unused_parameters=True)
        outputs = model(_ddp_images()[mine], tasks)
        deep_supervision_loss(outputs, label[:, :, :8, :8].repeat(1, 1, 2, 2), num_classes, tasks).backward()
        grads = {k: p.grad for k, p in model.module.named_parameters() if p.grad is not None}
        torch.save({"dice": dice.detach(), "loss": loss.detach(), "grad": logits.grad, "params": grads},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_batch_dice_is_gathered_over_ranks_as_one_batch(tmp_path) -> None:
    """2 gloo ranks give the Dice of the concatenated batch, and (after DDP's averaging over
    ranks) the gradient a single process gets on that batch, for the logits and for a network
    trained under DistributedDataParallel."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.start_processes(_rank_loss, args=(port, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    logits, label, num_classes, tasks = _ddp_batch()
    logits.requires_grad_()
    dice = soft_dice(logits, label, num_classes, tasks)
    loss = deep_supervision_loss([logits], label, num_classes, tasks)
    loss.backward()
    local = soft_dice(logits[:2], label[:2], num_classes[:2], tasks[:2])
    assert abs(local.item() - dice.item()) > 1e-3  # pooling over ranks changes the answer
    for r, result in enumerate(ranks):
        assert result["dice"].item() == pytest.approx(dice.item(), rel=1e-6)
        torch.testing.assert_close(result["grad"] / WORLD, logits.grad[2 * r : 2 * r + 2], rtol=1e-5, atol=1e-9)
    assert sum(r["loss"].item() for r in ranks) / WORLD == pytest.approx(loss.item(), rel=1e-6)

    network = _tiny_network()
    outputs = network(_ddp_images(), tasks)
    deep_supervision_loss(outputs, label[:, :, :8, :8].repeat(1, 1, 2, 2), num_classes, tasks).backward()
    trained = {name: p for name, p in network.named_parameters() if p.grad is not None}
    assert trained.keys() == ranks[0]["params"].keys() and len(trained) > 40
    largest = max(p.grad.abs().max() for p in trained.values())
    for name, parameter in trained.items():
        # DDP's averaged gradient is the single process's; biases before an instance norm have
        # none (float noise), hence the absolute tolerance relative to the largest gradient.
        torch.testing.assert_close(ranks[0]["params"][name], parameter.grad, rtol=1e-4, atol=1e-5 * largest)
        torch.testing.assert_close(ranks[1]["params"][name], ranks[0]["params"][name])
