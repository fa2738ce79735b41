"""Universal (multi-task) networks: UniSeg and the two baselines it is compared with.

All take `forward(x, task_ids)` with one task id per sample, so a batch may mix tasks and
channel counts, and return logits per deep-supervision level (highest resolution first) with
`max_classes` channels. Channels a sample's task does not have are filled with MASKED_LOGIT, so
softmax/cross-entropy over all channels equal those over the task's own classes; use
`crop_to_task` to cut a single-task batch down to its classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.blocks import ConvNormAct
from model.spec import NetworkSpec
from model.tasks import TaskSpec, check_task_table
from model.unet import Decoder, Encoder, SegmentationHeads

MASKED_LOGIT = -1.0e4  # finite, so it is safe in float16; softmax sends it to 0


class UniversalNetwork(nn.Module):
    """Shared input checks, encoder and class masking; subclasses implement `decode`."""

    def __init__(self, spec: NetworkSpec, tasks: Sequence[TaskSpec], extra_bottleneck_channels: int = 0,
                 extra_last_channels: int = 0):
        super().__init__()
        self.spec = spec
        self.tasks = check_task_table(tasks)
        self.max_classes = max(t.num_classes for t in self.tasks)
        self.encoder = Encoder([t.in_channels for t in self.tasks], spec.features, spec.strides, spec.kernels)
        self.decoder = Decoder(spec.features, spec.strides, spec.decoder_stage_kernels, extra_bottleneck_channels,
                               extra_last_channels)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | Sequence[int] | int) -> list[torch.Tensor]:
        ids = self.check_inputs(x, task_ids)
        features = self.encoder(x, [self.tasks[i].in_channels for i in ids])
        logits = self.decode(features, ids)
        return [mask_classes(out, [self.tasks[i].num_classes for i in ids]) for out in logits]

    def decode(self, features: list[torch.Tensor], task_ids: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError

    def check_inputs(self, x: torch.Tensor, task_ids: torch.Tensor | Sequence[int] | int) -> list[int]:
        """Validate shapes and ids; return one task id per sample."""
        if x.ndim != 5:
            raise ValueError(f"expected input of shape (B, C, Z, Y, X), got {tuple(x.shape)}")
        ids = torch.as_tensor(task_ids).cpu().reshape(-1).tolist()
        if len(ids) == 1:
            ids = ids * x.shape[0]
        if len(ids) != x.shape[0]:
            raise ValueError(f"got {len(ids)} task ids for a batch of {x.shape[0]}")
        unknown = sorted({i for i in ids if not 0 <= i < len(self.tasks)})
        if unknown:
            known = ", ".join(f"{i}={t.name}" for i, t in enumerate(self.tasks))
            raise ValueError(f"unknown task id(s) {unknown}; this model knows {known}")
        expected = max(self.tasks[i].in_channels for i in ids)
        if x.shape[1] != expected:
            asked = sorted({self.tasks[i].name for i in ids})
            raise ValueError(
                f"input has {x.shape[1]} channels but task(s) {', '.join(asked)} need {expected} "
                f"(mixed batches are zero-padded to the widest task)"
            )
        return ids

    def reach_key(self, task_id: int) -> tuple[int, ...]:
        """Tasks with equal keys train the same parameters (the input stem of their channel count
        and everything shared), so `pipeline.train.execution` probes one task per key."""
        return (self.tasks[task_id].in_channels,)

    def crop_to_task(self, logits: torch.Tensor, task_id: int) -> torch.Tensor:
        """Keep only the classes of `task_id` (background included)."""
        return logits[:, : self.tasks[task_id].num_classes]


def mask_classes(logits: torch.Tensor, num_classes: Sequence[int]) -> torch.Tensor:
    """Set channels >= each sample's class count to MASKED_LOGIT."""
    if all(n == logits.shape[1] for n in num_classes):
        return logits
    keep = torch.tensor([[c < n for c in range(logits.shape[1])] for n in num_classes])
    keep = keep.to(logits.device).reshape(*keep.shape, 1, 1, 1)
    return torch.where(keep, logits, logits.new_tensor(MASKED_LOGIT))


class UniSeg(UniversalNetwork):
    """UniSeg (Ye et al., MICCAI 2023): a learnable universal prompt fused with the bottleneck.

    The prompt holds `prompt_channels` feature maps per task. FUSE refines all task prompts from
    the image; the asked task's refined prompt is concatenated to the bottleneck so the whole
    decoder is task-aware. One head, shared across tasks, with max(num_classes) outputs.

    With `spec.prompt_last_stage` (not in the paper; a config choice, off by default) the selected
    prompt is also upsampled to full resolution and concatenated to the last decoder stage's
    input, so the layers feeding the shared head see the task directly, not only through the
    bottleneck.
    """

    def __init__(self, spec: NetworkSpec, tasks: Sequence[TaskSpec]):
        last = spec.prompt_channels if spec.prompt_last_stage else 0
        super().__init__(spec, tasks, extra_bottleneck_channels=spec.prompt_channels, extra_last_channels=last)
        prompt_maps = len(self.tasks) * spec.prompt_channels
        self.prompt = nn.Parameter(torch.randn(1, prompt_maps, *spec.resolved_prompt_size))
        kernel = (3, 3, 3)
        self.fuse = nn.Sequential(
            ConvNormAct(spec.features[-1] + prompt_maps, spec.fuse_channels, kernel),
            ConvNormAct(spec.fuse_channels, spec.fuse_channels, kernel),
            ConvNormAct(spec.fuse_channels, prompt_maps, kernel),
        )
        self.heads = SegmentationHeads(spec.features, self.max_classes, spec.deep_supervision)

    def decode(self, features: list[torch.Tensor], task_ids: list[int]) -> list[torch.Tensor]:
        bottleneck = features[-1]
        prompt = self.prompt
        if prompt.shape[2:] != bottleneck.shape[2:]:
            prompt = F.interpolate(prompt, size=bottleneck.shape[2:], mode="trilinear", align_corners=False)
        prompt = prompt.to(bottleneck.dtype).expand(bottleneck.shape[0], -1, -1, -1, -1)
        fused = self.fuse(torch.cat([bottleneck, prompt], dim=1))
        per_task = fused.unflatten(1, (len(self.tasks), self.spec.prompt_channels))
        selected = per_task[torch.arange(len(task_ids)), torch.tensor(task_ids)]
        last_extra = selected if self.spec.prompt_last_stage else None
        decoded = self.decoder(features[:-1], torch.cat([bottleneck, selected], dim=1), last_extra)
        return self.heads(decoded)


def add_tasks(network: UniSeg, new: Sequence[TaskSpec]) -> tuple[UniSeg, dict[str, torch.Tensor]]:
    """`network` with the `new` tasks after its own: a prompt slot and FUSE output maps per new
    task, head outputs for classes beyond the old ones, a stem for a new channel count.

    Every old weight is copied; the new prompts' inputs to FUSE are zero, so the old tasks' outputs
    stay those of `network` (up to float rounding). Returns the network and, per parameter, a
    mask of the elements that are new (the ones adding a task trains; all False for a parameter
    that is old throughout, such as FUSE's first convolution, whose zero columns stay zero). With
    the old elements frozen the new prompt slot gets no gradient: the new task is learnt by its
    FUSE output maps (and new head outputs and stem); a later joint training uses the slot.
    """
    grown = UniSeg(network.spec, [*network.tasks, *new])
    old = network.state_dict()
    new_elements = {}
    with torch.no_grad():
        for name, param in grown.named_parameters():
            mask = torch.ones_like(param, dtype=torch.bool)
            if name in old:  # not a new stem
                region = tuple(slice(0, n) for n in old[name].shape)
                if name == "fuse.0.conv.weight":
                    param.zero_()
                    mask[:] = False
                param[region] = old[name]
                mask[region] = False
            new_elements[name] = mask
    return grown, new_elements


class MultiHeadUNet(UniversalNetwork):
    """Baseline: a shared encoder-decoder with one segmentation head per task."""

    def __init__(self, spec: NetworkSpec, tasks: Sequence[TaskSpec]):
        super().__init__(spec, tasks)
        self.heads = nn.ModuleList(
            SegmentationHeads(spec.features, self.max_classes, spec.deep_supervision) for _ in self.tasks
        )

    def reach_key(self, task_id: int) -> tuple[int, ...]:
        return (self.tasks[task_id].in_channels, task_id)  # each task has its own head

    def decode(self, features: list[torch.Tensor], task_ids: list[int]) -> list[torch.Tensor]:
        decoded = self.decoder(features[:-1], features[-1])
        outputs: list[torch.Tensor | None] = [None] * len(self.heads[0].convs)
        for task in sorted(set(task_ids)):
            index = torch.tensor([i for i, t in enumerate(task_ids) if t == task])
            task_logits = self.heads[task]([d[index] for d in decoded])
            for level, logits in enumerate(task_logits):
                if outputs[level] is None:
                    outputs[level] = logits.new_empty((len(task_ids), *logits.shape[1:]))
                outputs[level][index] = logits
        return outputs  # type: ignore[return-value]


class DoDNet(UniversalNetwork):
    """Baseline in the style of DoDNet (Zhang et al., CVPR 2021): a task-conditioned dynamic head.

    A controller maps the pooled bottleneck and the task's one-hot code to the weights of three
    1x1x1 convolutions (width `dynamic_channels`) applied, per sample, at every output level.
    """

    def __init__(self, spec: NetworkSpec, tasks: Sequence[TaskSpec]):
        super().__init__(spec, tasks)
        width = spec.dynamic_channels
        levels = spec.features[:-1] if spec.deep_supervision else spec.features[:1]
        self.pre_head = nn.ModuleList(ConvNormAct(f, width, (1, 1, 1)) for f in levels)
        self.layer_shapes = [(width, width), (width, width), (self.max_classes, width)]
        num_params = sum(o * i + o for o, i in self.layer_shapes)
        self.controller = nn.Conv3d(spec.features[-1] + len(self.tasks), num_params, 1)

    def decode(self, features: list[torch.Tensor], task_ids: list[int]) -> list[torch.Tensor]:
        bottleneck = features[-1]
        code = F.one_hot(torch.tensor(task_ids), len(self.tasks)).to(bottleneck)
        pooled = bottleneck.mean(dim=(2, 3, 4))
        params = self.controller(torch.cat([pooled, code], dim=1)[:, :, None, None, None]).flatten(1)
        layers = self._split_params(params)
        decoded = self.decoder(features[:-1], bottleneck)
        return [self._dynamic_head(pre(x), layers) for pre, x in zip(self.pre_head, decoded)]

    def _split_params(self, params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        layers, offset = [], 0
        for out_ch, in_ch in self.layer_shapes:
            weight = params[:, offset : offset + out_ch * in_ch].unflatten(1, (out_ch, in_ch))
            offset += out_ch * in_ch
            bias = params[:, offset : offset + out_ch]
            offset += out_ch
            layers.append((weight, bias))
        return layers

    @staticmethod
    def _dynamic_head(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        for i, (weight, bias) in enumerate(layers):
            x = torch.einsum("boi,bizyx->bozyx", weight, x) + bias[:, :, None, None, None]
            if i < len(layers) - 1:
                x = F.relu(x)
        return x
