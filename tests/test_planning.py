"""nnU-Net's planner for the universal net: patch, topology and widths from spacing, median shape
and a memory budget; the named presets."""

from __future__ import annotations

import pytest

from model.presets import PRESETS, build_network, estimated_memory_gb, planned_spec
from model.tasks import TaskSpec
from model.topology import activation_count, initial_patch_size
from pipeline.common.config import ModelConfig
from pipeline.common.intensity import ChannelNormalization
from pipeline.common.store import StoreManifest
from pipeline.train.build import network_spec


def _manifest(spacing: tuple[float, float, float]) -> StoreManifest:
    return StoreManifest(
        task_name="t", modalities=("CT",), labels={0: "background", 1: "organ"}, target_spacing=spacing,
        normalization=(ChannelNormalization("zscore"),), cases={}, split={},
    )


def test_the_reference_budget_gives_the_reference_network() -> None:
    """At UniSeg's spacing-like (2.5, 0.8, 0.8) mm and its 10 GB, the planner lands on the paper's
    64 x 192 x 192 patch with 6 stages 32..320, [1, 3, 3] first kernels and its strides."""
    spec = planned_spec((2.5, 0.8, 0.8), (120, 400, 400), memory_gb=10.0)
    paper = PRESETS["uniseg-paper"]
    assert (spec.patch_size, spec.features, spec.strides, spec.kernels) == (
        paper.patch_size, paper.features, paper.strides, paper.kernels)
    assert estimated_memory_gb(paper) == pytest.approx(10.0)


def test_isotropic_data_gets_a_cube_and_a_smaller_budget_a_smaller_patch() -> None:
    spec = planned_spec((1.0, 1.0, 1.0), (140, 170, 140), memory_gb=8.0)
    assert spec.patch_size == (128, 128, 128) and spec.bottleneck_size == (4, 4, 4)
    small = planned_spec((1.0, 1.0, 1.0), (140, 170, 140), memory_gb=0.5)
    assert estimated_memory_gb(small) <= 0.5 < estimated_memory_gb(spec)
    assert all(s < b for s, b in zip(small.patch_size, spec.patch_size))


def test_thick_slices_keep_z_short_and_unpooled_first() -> None:
    spec = planned_spec((5.0, 0.8, 0.8), (60, 512, 512), memory_gb=8.0)
    assert spec.patch_size[0] < spec.patch_size[1] == spec.patch_size[2]
    assert spec.strides[1] == (1, 2, 2) and spec.kernels[0] == (1, 3, 3)


def test_initial_patch_is_isotropic_in_mm_and_capped_by_the_median_shape() -> None:
    assert initial_patch_size((1.0, 1.0, 1.0), (300, 300, 300)) == (256, 256, 256)
    assert initial_patch_size((2.0, 1.0, 1.0), (300, 300, 300)) == (161, 300, 300)  # (161, 323, 323), capped
    assert initial_patch_size((1.0, 1.0, 1.0), (40, 300, 300)) == (40, 256, 256)


def test_activation_count_by_hand() -> None:
    # Two stages at 4^3 and 2^3 voxels, widths 2 and 4: encoder 4*2*64 + 4*4*8; decoder 7*2*64.
    assert activation_count((4, 4, 4), [(1, 1, 1), (2, 2, 2)], (2, 4)) == 4 * 2 * 64 + 4 * 4 * 8 + 7 * 2 * 64


def test_network_spec_plans_when_no_preset_is_named() -> None:
    manifests = [_manifest((1.0, 1.0, 1.0)), _manifest((1.0, 1.0, 1.0))]
    spec = network_spec(ModelConfig(memory_gb=0.5), manifests, [(60, 90, 90), (140, 170, 140)])
    assert spec == planned_spec((1.0, 1.0, 1.0), (100, 130, 115), 0.5)
    with pytest.raises(ValueError, match="median image shapes"):
        network_spec(ModelConfig(), manifests)
    named = network_spec(ModelConfig(preset="cpu"), manifests)
    assert named.patch_size == PRESETS["cpu"].patch_size
    assert named.fuse_channels == PRESETS["cpu"].fuse_channels == 82
    assert network_spec(ModelConfig(preset="cpu", fuse_channels=8), manifests).fuse_channels == 8


def test_cpu_preset_builds_and_runs() -> None:
    import torch

    spec = PRESETS["cpu"]
    network = build_network(spec, [TaskSpec("a", 3, 1)])
    with torch.no_grad():
        out = network(torch.zeros(1, 1, *spec.patch_size), 0)
    assert out[0].shape == (1, 3, *spec.patch_size)


def test_task_median_shapes_reads_the_training_cases() -> None:
    from types import SimpleNamespace

    from pipeline.train.build import task_median_shapes

    class Store:
        shapes = {"a": (10, 100, 90), "b": (30, 120, 80), "c": (20, 80, 70), "v": (99, 999, 999)}

        def case_ids(self, split: str = "all") -> list[str]:
            return ["a", "b", "c"] if split == "train" else list(self.shapes)

        def case_meta(self, case_id: str) -> SimpleNamespace:
            return SimpleNamespace(shape=self.shapes[case_id])

    assert task_median_shapes([Store()]) == [(20, 100, 80)]
