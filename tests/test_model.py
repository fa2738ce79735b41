import pytest
import torch
import torch.nn.functional as F

from model.__main__ import main as model_cli
from model.presets import PRESETS, REFERENCE_TASKS, build_network, preset_spec
from model.spec import NetworkSpec
from model.tasks import TaskSpec
from model.topology import plan_topology
from model.transfer import FIRST_UPSAMPLING, transfer_to_single_task
from model.universal import MASKED_LOGIT

TASKS = (TaskSpec("ct_organ", 3, 1), TaskSpec("mr_prostate", 2, 2), TaskSpec("mr_brain", 4, 4))
SPEC = PRESETS["tiny"].replace(patch_size=(16, 32, 32))
UNIVERSAL = ("uniseg", "multihead", "dodnet")


def _net(architecture: str = "uniseg", seed: int = 0, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network(SPEC.replace(architecture=architecture, **changes), TASKS).eval()


def _input(channels: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, *SPEC.patch_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("architecture", UNIVERSAL)
def test_output_shape_at_every_deep_supervision_scale(architecture: str) -> None:
    outputs = _net(architecture)(_input(1, batch=2), 0)
    assert [tuple(o.shape) for o in outputs] == [
        (2, 4, 16, 32, 32),
        (2, 4, 16, 16, 16),
        (2, 4, 8, 8, 8),
        (2, 4, 4, 4, 4),
    ]


def test_without_deep_supervision_only_full_resolution() -> None:
    outputs = _net(deep_supervision=False)(_input(1), 0)
    assert len(outputs) == 1 and outputs[0].shape[2:] == SPEC.patch_size


@pytest.mark.parametrize("architecture", UNIVERSAL)
def test_classes_beyond_the_task_are_masked_and_cropped(architecture: str) -> None:
    net = _net(architecture)
    logits = net(_input(2), 1)[0]
    assert torch.all(logits[:, 2:] == MASKED_LOGIT)
    cropped = net.crop_to_task(logits, 1)
    assert cropped.shape[1] == 2
    torch.testing.assert_close(torch.softmax(logits, 1)[:, :2], torch.softmax(cropped, 1))
    target = torch.randint(0, 2, (1, *SPEC.patch_size))
    torch.testing.assert_close(F.cross_entropy(logits, target), F.cross_entropy(cropped, target))


@pytest.mark.parametrize("architecture", UNIVERSAL)
def test_mixed_task_batch_equals_per_sample_runs(architecture: str) -> None:
    net = _net(architecture)
    samples = [(_input(1, seed=2), 0), (_input(4, seed=3), 2), (_input(2, seed=4), 1), (_input(1, seed=5), 0)]
    padded = torch.cat([F.pad(x, (0, 0, 0, 0, 0, 0, 0, 4 - x.shape[1])) for x, _ in samples])
    with torch.no_grad():
        mixed = net(padded, [task for _, task in samples])
        for i, (x, task) in enumerate(samples):
            alone = net(x, task)
            for level_mixed, level_alone in zip(mixed, alone):
                # He init makes logits of order 1-10: float32 summation order (batched vs alone) moves
                # single values by ~1e-5.
                torch.testing.assert_close(level_mixed[i : i + 1], level_alone, atol=1e-4, rtol=1e-4)


def test_wrong_channel_count_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="input has 1 channels but task.*mr_brain need 4"):
        _net()(_input(1), 2)


@pytest.mark.parametrize("task_ids", [3, [0, -1]])
def test_unknown_task_id_is_a_clear_error(task_ids) -> None:
    with pytest.raises(ValueError, match=r"unknown task id.*this model knows 0=ct_organ, 1=mr_prostate, 2=mr_brain"):
        _net()(_input(1, batch=2), task_ids)


def test_task_id_count_must_match_batch() -> None:
    with pytest.raises(ValueError, match="got 3 task ids for a batch of 2"):
        _net()(_input(1, batch=2), [0, 0, 0])


def test_prompt_receives_gradient() -> None:
    net = _net().train()
    loss = sum(o[:, :3].mean() for o in net(_input(1, batch=2), 0))
    loss.backward()
    assert net.prompt.grad is not None and net.prompt.grad.abs().sum() > 0
    assert net.fuse[0].conv.weight.grad.abs().sum() > 0


def test_only_the_asked_task_prompt_reaches_the_decoder() -> None:
    net = _net()
    x = _input(1)
    before = net(x, 0)[0]
    with torch.no_grad():
        net.fuse[2].conv.weight[1:2].add_(1.0)  # perturb the FUSE output of task 1 only
    torch.testing.assert_close(net(x, 0)[0], before)
    assert not torch.allclose(net(_input(2), 1)[0], _net()(_input(2), 1)[0])


def test_task_aware_last_stage_feeds_the_selected_prompt_to_the_last_decoder_stage() -> None:
    net, seen = _net(prompt_last_stage=True), {}
    net.fuse.register_forward_hook(lambda module, args, out: seen.update(fused=out))
    net.decoder.stages[-1].register_forward_hook(lambda module, args, out: seen.update(last_input=args[0]))
    net(_input(4), 2)
    expected = F.interpolate(seen["fused"][:, 2:3], size=SPEC.patch_size, mode="trilinear", align_corners=False)
    assert seen["last_input"].shape[1] == 2 * SPEC.features[0] + 1
    torch.testing.assert_close(seen["last_input"][:, -1:], expected)
    assert _net().decoder.stages[-1].blocks[0].conv.in_channels == 2 * SPEC.features[0]  # the paper's UniSeg


def test_prompt_size_is_configurable() -> None:
    net = _net(prompt_channels=2, prompt_size=(1, 1, 1), fuse_channels=8)
    assert tuple(net.prompt.shape) == (1, len(TASKS) * 2, 1, 1, 1)
    assert net(_input(1), 0)[0].shape[2:] == SPEC.patch_size


@pytest.mark.parametrize("architecture", UNIVERSAL)
def test_seeded_training_step_is_deterministic(architecture: str) -> None:
    def step() -> list[torch.Tensor]:
        net = _net(architecture, seed=7).train()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
        x, target = _input(1, batch=2, seed=3), torch.randint(0, 3, (2, *SPEC.patch_size), generator=torch.Generator().manual_seed(3))
        F.cross_entropy(net(x, 0)[0], target).backward()
        optimizer.step()
        return [p.detach().clone() for p in net.parameters()]

    for a, b in zip(step(), step()):
        assert torch.equal(a, b)


def test_transfer_loads_every_matching_weight() -> None:
    universal = _net("uniseg", seed=3)
    source = universal.state_dict()
    plain, report = transfer_to_single_task(source, universal.spec, in_channels=4, num_classes=5)
    target = plain.state_dict()
    assert report.adapted == (FIRST_UPSAMPLING,)
    assert all(name.startswith("heads.") for name in report.reinitialised)
    assert set(report.loaded) == {n for n in target if not n.startswith("heads.") and n != FIRST_UPSAMPLING}
    for name in report.loaded:
        assert torch.equal(target[name], source[name]), name
    torch.testing.assert_close(target[FIRST_UPSAMPLING], source[FIRST_UPSAMPLING][: SPEC.features[-1]])
    assert {"prompt", "encoder.stems.1.weight", "encoder.stems.2.weight"} <= set(report.dropped)
    assert any(name.startswith("fuse.") for name in report.dropped)
    assert [o.shape[1] for o in plain(_input(4))] == [5] * 4
    # The transferred encoder computes exactly what the universal one does.
    with torch.no_grad():
        torch.testing.assert_close(plain.encoder(_input(4))[-1], universal.encoder(_input(4))[-1])


def test_transfer_to_an_unseen_channel_count_reinitialises_the_stem() -> None:
    universal = _net("uniseg")
    _, report = transfer_to_single_task(universal.state_dict(), universal.spec, in_channels=3, num_classes=2)
    assert "encoder.stems.3.weight" in report.reinitialised
    assert "encoder.stems.1.weight" in report.dropped


def test_topology_follows_nnunet_rule_for_anisotropic_data() -> None:
    strides, kernels, patch = plan_topology((64, 192, 192), (3.0, 0.8, 0.8), max_stages=6)
    assert strides[0] == (1, 1, 1) and strides[1] == (1, 2, 2)
    assert kernels[0] == (1, 3, 3) and kernels[-1] == (3, 3, 3)
    assert len(strides) == 6 and patch == (64, 192, 192)


def test_topology_isotropic_pools_every_axis_and_rounds_patch_up() -> None:
    strides, kernels, patch = plan_topology((22, 64, 64), (1.0, 1.0, 1.0), max_stages=4)
    assert strides == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 2, 2)]  # z stops at 6 < 2 * 4
    assert all(k == (3, 3, 3) for k in kernels)
    assert patch == (24, 64, 64)


def test_preset_with_spacing_replans() -> None:
    spec = preset_spec("tiny", patch_size=(32, 64, 64), spacing=(2.5, 0.8, 0.8), architecture="multihead")
    assert spec.architecture == "multihead" and spec.kernels[0] == (1, 3, 3)
    assert build_network(spec, TASKS)(torch.zeros(1, 1, *spec.patch_size), 0)[0].shape[2:] == spec.patch_size


def test_spec_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match="must be divisible by the total stride"):
        SPEC.replace(patch_size=(15, 32, 32))
    with pytest.raises(ValueError, match="one entry per stage"):
        SPEC.replace(features=(8, 16))
    with pytest.raises(ValueError, match="unknown preset"):
        preset_spec("huge")
    assert NetworkSpec.from_dict(SPEC.to_dict()) == SPEC


def test_task_table_errors() -> None:
    with pytest.raises(ValueError, match="duplicate task names: a"):
        build_network(SPEC, [TaskSpec("a", 2, 1), TaskSpec("a", 3, 1)])
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        TaskSpec("a", 1, 1)


def test_cli_prints_summary(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="model"):
        model_cli(["--preset", "tiny", "--tasks", "3"])
    text = caplog.text
    assert "bottleneck        (64, 4, 4, 4)" in text and "MACs per forward" in text and "(3 tasks)" in text


def test_reference_task_table_matches_the_paper() -> None:
    assert len(REFERENCE_TASKS) == 11
    assert {t.in_channels for t in REFERENCE_TASKS} == {1, 2, 4}
    assert max(t.num_classes for t in REFERENCE_TASKS) == 4
