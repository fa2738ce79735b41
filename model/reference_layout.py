"""The UniSeg reference code's state-dict layout and its one-to-one correspondence with ours.

The reference (github.com/yeerwen/UniSeg) builds `UniSeg_model`, nnU-Net v1's Generic_UNet with
a prompt, as its `UniSeg_Trainer` wires it. Read from its code, tensor by tensor (P = number of
poolings = stages - 1; every conv block is conv -> instnorm -> LeakyReLU, `ConvDropoutNormNonlin`):

- `conv_blocks_context.0.blocks.0.conv_{1,2,4}`: one first conv per input channel count 1, 2, 4
  (the trainer passes [1, 2, 4]; the forward pass picks the one matching x.shape[1]), then that
  block's `instnorm`; `conv_blocks_context.0.blocks.1`: the stem's second conv.
- `conv_blocks_context.{d}.blocks.{0,1}` for d = 1 .. P-1: encoder stage d (its first conv strided).
- `conv_blocks_context.{P}.{0,1}.blocks.0`: the bottleneck, two one-conv stacks.
- `intermedia_prompt` (1, tasks, z, y, x); `fusion_layer.blocks.{0,1,2}`: FUSE (3x3x3 convs).
- `tu.{u}` (transposed conv, no bias) and `conv_blocks_localization.{u}.{0,1}.blocks.0`: decoder
  stage u, deepest first.
- `seg_outputs.{u}`: 1x1x1 head (no bias) of decoder stage u, deepest first.

Ours (model/universal.py) holds the same tensors under other names; only the heads are counted
the other way round (ours: highest resolution first). Nothing is reshaped, so the import is a
renaming, and `reference_key_map` is that renaming.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from model.spec import NetworkSpec
from model.topology import Triple

REFERENCE_STEMS: tuple[int, ...] = (1, 2, 4)  # UniSeg_Trainer: UniSeg_model(..., [1, 2, 4], ...)
FUSE_KERNEL: Triple = (3, 3, 3)  # ours; the reference's FUSE takes the bottleneck's kernel
PROMPT_DIVISORS: Triple = (16, 32, 32)  # the reference sizes its prompt as patch // (16, 32, 32)


class ReferenceLayoutError(ValueError):
    """A state dict that is not a UniSeg reference network (or not one ours can hold)."""


@dataclass(frozen=True)
class ReferenceNetwork:
    """What a reference state dict says about its network: our spec for it and its head."""

    spec: NetworkSpec
    num_tasks: int
    max_classes: int
    stems: tuple[int, ...]  # input channel counts it has a first conv for


def _block(ref: str, ours: str) -> dict[str, str]:
    """ConvDropoutNormNonlin -> ConvNormAct."""
    return {
        f"{ref}.conv.weight": f"{ours}.conv.weight",
        f"{ref}.conv.bias": f"{ours}.conv.bias",
        f"{ref}.instnorm.weight": f"{ours}.norm_act.0.weight",
        f"{ref}.instnorm.bias": f"{ours}.norm_act.0.bias",
    }


def reference_key_map(stages: int, stems: Sequence[int] = REFERENCE_STEMS) -> dict[str, str]:
    """Reference tensor name -> our tensor name, for every tensor of a UniSeg network with
    `stages` resolution stages (the reference's num_pool + 1) and first convs for `stems`."""
    if stages < 2:
        raise ReferenceLayoutError(f"a U-Net has at least 2 stages, got {stages}")
    pools = stages - 1
    names = {"intermedia_prompt": "prompt"}
    for c in stems:
        names[f"conv_blocks_context.0.blocks.0.conv_{c}.weight"] = f"encoder.stems.{c}.weight"
        names[f"conv_blocks_context.0.blocks.0.conv_{c}.bias"] = f"encoder.stems.{c}.bias"
    names["conv_blocks_context.0.blocks.0.instnorm.weight"] = "encoder.stem_rest.0.0.weight"
    names["conv_blocks_context.0.blocks.0.instnorm.bias"] = "encoder.stem_rest.0.0.bias"
    names |= _block("conv_blocks_context.0.blocks.1", "encoder.stem_rest.1")
    for d in range(1, pools):
        for j in (0, 1):
            names |= _block(f"conv_blocks_context.{d}.blocks.{j}", f"encoder.stages.{d - 1}.blocks.{j}")
    for j in (0, 1):
        names |= _block(f"conv_blocks_context.{pools}.{j}.blocks.0", f"encoder.stages.{pools - 1}.blocks.{j}")
    for j in (0, 1, 2):
        names |= _block(f"fusion_layer.blocks.{j}", f"fuse.{j}")
    for u in range(pools):
        names[f"tu.{u}.weight"] = f"decoder.upsample.{u}.weight"
        for j in (0, 1):
            names |= _block(f"conv_blocks_localization.{u}.{j}.blocks.0", f"decoder.stages.{u}.blocks.{j}")
        names[f"seg_outputs.{u}.weight"] = f"heads.convs.{pools - 1 - u}.weight"
    return names


def check_reference_compatible(spec: NetworkSpec) -> None:
    """Raise ReferenceLayoutError naming every way `spec` is not a network the reference's code
    builds (so neither import nor export can be exact)."""
    problems = []
    if spec.architecture != "uniseg":
        problems.append(f"architecture {spec.architecture!r} (the reference is 'uniseg')")
    if spec.prompt_channels != 1:
        problems.append(f"prompt_channels {spec.prompt_channels} (the reference has 1 per task)")
    if spec.prompt_last_stage:
        problems.append("prompt_last_stage (not in the reference)")
    if not spec.deep_supervision:
        problems.append("deep_supervision off (the reference always has a head per decoder stage)")
    if spec.decoder_kernels != "nnunet-v1":
        problems.append(f"decoder_kernels {spec.decoder_kernels!r} (the reference's Generic_UNet is 'nnunet-v1')")
    if tuple(spec.strides[0]) != (1, 1, 1):
        problems.append(f"first stride {tuple(spec.strides[0])} (the reference's stem has stride 1)")
    if any(k not in (1, 3) for kernel in spec.kernels for k in kernel):
        problems.append(f"kernels {spec.kernels}: the reference pads 1 for a 3 and 0 for anything else, "
                        "so only kernels of 1 and 3 keep the size as ours do")
    if tuple(spec.kernels[-1]) != FUSE_KERNEL:
        problems.append(f"bottleneck kernel {tuple(spec.kernels[-1])}: the reference's FUSE convolves with it, "
                        f"ours with {FUSE_KERNEL}")
    if problems:
        raise ReferenceLayoutError("not a UniSeg reference network: " + "; ".join(problems))


V = TypeVar("V")  # a state dict's values: tensors or their shapes


def strip_data_parallel(state: Mapping[str, V]) -> dict[str, V]:
    """Drop nn.DataParallel's `module.` prefix, as the reference's own loader does."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def describe_reference(shapes: Mapping[str, Sequence[int]], patch_size: Sequence[int]) -> ReferenceNetwork:
    """Our spec for the reference network whose tensors have these shapes, trained on
    `patch_size` (the plans'). Features, kernels, strides, FUSE width, prompt size, task count,
    head width and stems all come from the shapes; the patch only sets our spec's patch (and so
    whether the prompt needs an explicit size)."""
    shapes = {k: tuple(v) for k, v in strip_data_parallel(shapes).items()}
    upsamplings = [int(k.split(".")[1]) for k in shapes if k.startswith("tu.")]
    if not upsamplings:
        raise ReferenceLayoutError("not a UniSeg reference state dict (no tu.* upsampling tensors)")
    stems = tuple(c for c in REFERENCE_STEMS if f"conv_blocks_context.0.blocks.0.conv_{c}.weight" in shapes)
    if not stems:
        raise ReferenceLayoutError("not a UniSeg reference state dict (no first convolution "
                                   "conv_blocks_context.0.blocks.0.conv_{1,2,4})")
    pools = 1 + max(upsamplings)
    try:
        stem = shapes[f"conv_blocks_context.0.blocks.0.conv_{stems[0]}.weight"]
        encoder = [stem] + [shapes[f"conv_blocks_context.{d}.blocks.0.conv.weight"] for d in range(1, pools)]
        encoder.append(shapes[f"conv_blocks_context.{pools}.0.blocks.0.conv.weight"])
        strides = [(1, 1, 1)] + [tuple(shapes[f"tu.{pools - 1 - i}.weight"][2:]) for i in range(pools)]
        prompt = shapes["intermedia_prompt"]
        fuse = shapes["fusion_layer.blocks.0.conv.weight"]
        heads = shapes["seg_outputs.0.weight"]
        decoder = [shapes[f"conv_blocks_localization.{u}.0.blocks.0.conv.weight"] for u in range(pools)]
    except KeyError as err:
        raise ReferenceLayoutError(f"not a UniSeg reference state dict (no {err})") from None
    kernels = tuple(tuple(int(k) for k in w[2:]) for w in encoder)
    for u, w in enumerate(decoder):
        if tuple(w[2:]) != kernels[-(u + 1)]:
            raise ReferenceLayoutError(
                f"conv_blocks_localization.{u} convolves {tuple(w[2:])}, but nnU-Net v1's rule gives it "
                f"the encoder's kernel {kernels[-(u + 1)]} (conv_kernel_sizes[-(u + 1)])")
    features = tuple(int(w[0]) for w in encoder)
    spec = NetworkSpec(
        architecture="uniseg",
        patch_size=tuple(int(p) for p in patch_size),  # type: ignore[arg-type]
        features=features,
        strides=tuple(tuple(int(s) for s in st) for st in strides),  # type: ignore[arg-type]
        kernels=kernels,  # type: ignore[arg-type]
        fuse_channels=int(fuse[0]),
        decoder_kernels="nnunet-v1",
    )
    prompt_size = tuple(int(n) for n in prompt[2:])
    if prompt_size != spec.bottleneck_size:
        spec = spec.replace(prompt_size=prompt_size)
    check_reference_compatible(spec)
    return ReferenceNetwork(spec=spec, num_tasks=int(prompt[1]), max_classes=int(heads[0]), stems=stems)


def from_reference(state: Mapping[str, torch.Tensor], spec: NetworkSpec,
                   stems: Sequence[int] = REFERENCE_STEMS) -> dict[str, torch.Tensor]:
    """Our state dict from a reference one: every tensor renamed, none left over, none missing,
    shapes unchanged (ReferenceLayoutError naming the tensors otherwise)."""
    check_reference_compatible(spec)
    state = strip_data_parallel(state)
    names = reference_key_map(len(spec.features), stems)
    missing = sorted(set(names) - set(state))
    extra = sorted(set(state) - set(names))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"left over {', '.join(extra)}"] if extra else [])
        raise ReferenceLayoutError("reference state dict does not match the network: " + "; ".join(parts))
    return {names[k]: v for k, v in state.items()}


def to_reference(state: Mapping[str, torch.Tensor], spec: NetworkSpec) -> dict[str, torch.Tensor]:
    """The reference's state dict from ours (the inverse of `from_reference`). The reference
    always has first convs for 1, 2 and 4 channels; one our network lacks (no task of that
    channel count) is written as zeros, which the reference never uses for our tasks."""
    check_reference_compatible(spec)
    ours_to_ref = {v: k for k, v in reference_key_map(len(spec.features), REFERENCE_STEMS).items()}
    unknown = sorted(set(state) - set(ours_to_ref))
    if unknown:
        raise ReferenceLayoutError(f"tensors without a place in the reference layout: {', '.join(unknown)}")
    out = {ours_to_ref[k]: v for k, v in state.items()}
    stem = next(v for k, v in state.items() if k.startswith("encoder.stems.") and k.endswith(".weight"))
    for c in REFERENCE_STEMS:
        weight = f"conv_blocks_context.0.blocks.0.conv_{c}.weight"
        if weight not in out:
            out[weight] = stem.new_zeros((stem.shape[0], c, *stem.shape[2:]))
            out[weight.replace(".weight", ".bias")] = stem.new_zeros(stem.shape[0])
    return out


def drop_unused_stems(state: Mapping[str, torch.Tensor], used: Sequence[int]) -> tuple[dict[str, torch.Tensor],
                                                                                       list[str]]:
    """A reference state dict without the first convs for channel counts not in `used` (the
    reference's trainer builds all of 1, 2 and 4 whatever its tasks), and the names dropped."""
    state = strip_data_parallel(state)
    unused = {f"conv_blocks_context.0.blocks.0.conv_{c}.{p}" for c in REFERENCE_STEMS if c not in used
              for p in ("weight", "bias")}
    dropped = sorted(unused & set(state))
    return {k: v for k, v in state.items() if k not in unused}, dropped
