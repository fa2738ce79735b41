"""NetworkSpec: everything needed to rebuild a network, saved with every model as JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from model.topology import Triple, total_stride

Architecture = Literal["uniseg", "multihead", "dodnet", "plain"]
DecoderKernels = Literal["nnunet-v2", "nnunet-v1"]
ARCHITECTURES: tuple[str, ...] = ("uniseg", "multihead", "dodnet", "plain")


@dataclass(frozen=True)
class NetworkSpec:
    """Architecture of a U-Net family network; axes are (z, y, x).

    `prompt_size=None` ties the prompt to the bottleneck size of `patch_size` (as UniSeg does).
    `dynamic_channels` is the width of the DoDNet-style dynamic head. `prompt_last_stage` (UniSeg
    only) also feeds the selected prompt to the last decoder stage (not in the paper).
    `decoder_kernels` says which encoder kernel each decoder stage takes: "nnunet-v2" mirrors the
    encoder (the stage that outputs level i convolves with kernels[i]); "nnunet-v1" is Generic_UNet's
    rule, which the UniSeg reference inherits (decoder stage u, deepest first, takes
    kernels[-(u + 1)]: the stage that outputs level i takes kernels[i + 1]).
    """

    architecture: Architecture
    patch_size: Triple
    features: tuple[int, ...]
    strides: tuple[Triple, ...]
    kernels: tuple[Triple, ...]
    deep_supervision: bool = True
    prompt_channels: int = 1
    prompt_size: Triple | None = None
    fuse_channels: int = 82
    dynamic_channels: int = 8
    prompt_last_stage: bool = False
    decoder_kernels: DecoderKernels = "nnunet-v2"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        stages = len(self.features)
        if stages < 2 or len(self.strides) != stages or len(self.kernels) != stages:
            raise ValueError(
                f"features, strides and kernels need one entry per stage (>= 2), got "
                f"{len(self.features)}, {len(self.strides)}, {len(self.kernels)}"
            )
        for name in ("strides", "kernels"):
            for entry in getattr(self, name):
                if len(entry) != 3 or min(entry) < 1:
                    raise ValueError(f"each of {name} must be 3 positive ints (z, y, x), got {entry}")
        if any(k % 2 == 0 for kernel in self.kernels for k in kernel):
            raise ValueError(f"kernels must be odd for same padding, got {self.kernels}")
        factor = total_stride(self.strides)
        if any(p % f for p, f in zip(self.patch_size, factor)):
            raise ValueError(f"patch_size {self.patch_size} must be divisible by the total stride {factor}")
        if min(self.prompt_channels, self.fuse_channels, self.dynamic_channels) < 1:
            raise ValueError("prompt_channels, fuse_channels and dynamic_channels must be >= 1")
        if self.decoder_kernels not in ("nnunet-v2", "nnunet-v1"):
            raise ValueError(f"decoder_kernels must be 'nnunet-v2' or 'nnunet-v1', got {self.decoder_kernels!r}")

    @property
    def decoder_stage_kernels(self) -> tuple[Triple, ...]:
        """Kernel of the decoder stage whose output is level i, for i = 0 .. stages - 2."""
        shift = 1 if self.decoder_kernels == "nnunet-v1" else 0
        return tuple(self.kernels[i + shift] for i in range(len(self.features) - 1))

    @property
    def bottleneck_size(self) -> Triple:
        factor = total_stride(self.strides)
        return tuple(p // f for p, f in zip(self.patch_size, factor))  # type: ignore[return-value]

    @property
    def resolved_prompt_size(self) -> Triple:
        return self.prompt_size or self.bottleneck_size

    def replace(self, **changes: Any) -> NetworkSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown network spec keys: {', '.join(unknown)}")
        data = dict(data)
        for key in ("patch_size", "prompt_size", "features"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        for key in ("strides", "kernels"):
            data[key] = tuple(tuple(v) for v in data[key])
        return cls(**data)
