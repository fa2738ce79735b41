"""The paper preset against the reference network, counted layer by layer from the reference's code (the
reference's Generic_UNet: decoder stage u, deepest first, convolves with conv_kernel_sizes[-(u + 1)])."""

from model.presets import PRESETS, REFERENCE_TASKS
from model.summary import summarize


def _conv(c_in: int, c_out: int, kernel: int, bias: bool = True) -> int:
    return c_in * c_out * kernel + (c_out if bias else 0)


def _conv_in(c_in: int, c_out: int, kernel: int) -> int:
    return _conv(c_in, c_out, kernel) + 2 * c_out  # InstanceNorm3d(affine)


def reference_uniseg_parameters(num_tasks: int = 11) -> int:
    """Reference UniSeg: 6 stages 32..320, [1,3,3] first-stage kernels, stems for 1/2/4 channels,
    transposed convs without bias, FUSE (320+N)->82->82->N, prompt (N,4,6,6), heads 4 classes."""
    f = [32, 64, 128, 256, 320, 320]
    k = [9, 27, 27, 27, 27, 27]
    up = [4, 8, 8, 8, 8]  # transposed-conv kernel = stride of the stage below
    total = sum(_conv(c, f[0], k[0]) for c in (1, 2, 4)) + 2 * f[0] + _conv_in(f[0], f[0], k[0])
    total += sum(_conv_in(f[i - 1], f[i], k[i]) + _conv_in(f[i], f[i], k[i]) for i in range(1, 6))
    total += _conv(f[5] + 1, f[4], up[4], bias=False)  # bottleneck + prompt channel
    total += sum(_conv(f[i + 1], f[i], up[i], bias=False) for i in range(4))
    total += sum(_conv_in(2 * f[i], f[i], k[i + 1]) + _conv_in(f[i], f[i], k[i + 1]) for i in range(5))
    total += sum(_conv(c, 4, 1, bias=False) for c in f[:5])
    total += _conv_in(320 + num_tasks, 82, 27) + _conv_in(82, 82, 27) + _conv_in(82, num_tasks, 27)
    return total + num_tasks * 4 * 6 * 6


def test_paper_preset_is_the_reference_network() -> None:
    summary = summarize(PRESETS["uniseg-paper"], REFERENCE_TASKS)
    reference = reference_uniseg_parameters()
    assert reference == 32_114_381  # the reference's code built at this topology
    assert summary.parameters == reference
    assert abs(summary.macs - 0.76e12) / 0.76e12 < 0.02  # the paper's 0.76 TMAC
    assert summary.bottleneck_shape == (320, 4, 6, 6)
    assert len(summary.output_shapes) == 5


def test_decoder_kernels_mirror_the_encoder_unless_the_v1_rule_is_asked_for() -> None:
    paper = PRESETS["uniseg-paper"]
    assert paper.decoder_stage_kernels == ((3, 3, 3),) * 5  # the last stage takes kernels[1], not kernels[0]
    mirrored = paper.replace(decoder_kernels="nnunet-v2")
    assert mirrored.decoder_stage_kernels == paper.kernels[:5]
    assert summarize(mirrored, REFERENCE_TASKS).parameters == 32_114_381 - 55_296  # 2 convs of the last stage, 9 vs 27 taps
    assert PRESETS["tiny"].decoder_kernels == PRESETS["cpu"].decoder_kernels == "nnunet-v2"
