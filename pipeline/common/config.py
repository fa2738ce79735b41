"""The one experiment config: loaded from YAML, checked once, then passed to every stage.

Sections are frozen dataclasses validated by pydantic in strict mode, so unknown keys, wrong
types and missing local files fail at load with the file and the dotted key in the message.
Ray and MLflow get the config as a plain dict through `to_dict` at their boundary only.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    ConfigDict,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic.dataclasses import dataclass

from pipeline.common.config_sources import (
    COMMAND_LINE, ConfigError, apply_overrides, format_errors, read_old_amp, read_yaml,
)

_STRICT = ConfigDict(extra="forbid", strict=True)


def _is_remote(uri: str) -> bool:
    return "://" in uri


@dataclass(frozen=True, config=_STRICT)
class DataConfig:
    """Zarr stores written by `pipeline.ingest`, one per task (local paths or s3:// URIs)."""

    stores: tuple[str, ...] = ()
    fold: NonNegativeInt | None = None  # cross-validation fold held out for validation (None: the stores' split, fold 0)
    allow_incomplete_stores: bool = False  # train on a store whose last ingest failed or left failed/stale cases

    @field_validator("stores")
    @classmethod
    def _local_stores_exist(cls, stores: tuple[str, ...]) -> tuple[str, ...]:
        missing = [s for s in stores if not _is_remote(s) and not Path(s).exists()]
        if missing:
            raise ValueError(f"store not found: {', '.join(missing)}")
        # Absolute, because Ray workers and jobs run in other working directories.
        return tuple(s if _is_remote(s) else str(Path(s).resolve()) for s in stores)


@dataclass(frozen=True, config=_STRICT)
class IngestConfig:
    """How `pipeline.ingest` turns raw datasets into Zarr stores (CLI flags fill it)."""

    target_spacing: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = None  # (z, y, x) mm; None: planned
    ct_normalization: Literal["nnunet", "uniseg-window"] = "nnunet"
    image_order: Literal[1, 3] = 3
    label_resampling: Literal["nearest", "per-class-linear"] = "nearest"
    folds: int = 5  # cross-validation folds per store, stable per case (pipeline/ingest/split.py); fold 0 validates
    split_seed: int = 0  # seed of the fold draw
    overwrite: bool = False
    scheduler: str | None = None
    on_ray: bool = False
    host: str = "127.0.0.1"  # interface the local Dask cluster, its dashboard and a local Ray listen on
    num_workers: PositiveInt | None = None
    chunk_size: tuple[PositiveInt, PositiveInt, PositiveInt] = (32, 32, 32)  # (z, y, x); 32^3 reads faster than 64^3
    max_class_locations: PositiveInt = 10_000  # stored voxel samples per class (foreground oversampling)
    change_detection: Literal["content", "stat"] = "content"  # hash the files, or trust unchanged size+mtime

    @field_validator("folds")
    @classmethod
    def _at_least_two_folds(cls, folds: int) -> int:
        if folds < 2:
            raise ValueError(f"must be >= 2, got {folds}")
        return folds


@dataclass(frozen=True, config=_STRICT)
class ModelConfig:
    """Network preset plus the overrides a search or an experiment may change."""

    preset: Literal["tiny", "cpu", "uniseg-paper"] | None = None  # None: planned from the stores (nnU-Net's planner)
    memory_gb: PositiveFloat = 8.0  # training memory budget of a planned network at batch 2 (nnU-Net's default)
    architecture: Literal["uniseg", "multihead", "dodnet"] = "uniseg"
    patch_size: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None
    features: tuple[PositiveInt, ...] | None = None
    prompt_channels: PositiveInt = 1
    prompt_size: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None
    fuse_channels: PositiveInt | None = None  # None: the preset's (82, the paper's, in every preset)
    deep_supervision: bool = True
    prompt_last_stage: bool = False  # UniSeg: the task prompt also enters the last decoder stage (not in the paper)


@dataclass(frozen=True, config=_STRICT)
class TrainConfig:
    """Schedule and recipe; defaults are UniSeg's (SGD Nesterov, poly lr, Dice+CE)."""

    epochs: PositiveInt = 1000
    iterations_per_epoch: PositiveInt = 550
    batch_size: PositiveInt = 2
    learning_rate: PositiveFloat = 1e-2
    momentum: NonNegativeFloat = 0.99
    weight_decay: NonNegativeFloat = 3e-5
    poly_exponent: NonNegativeFloat = 0.9
    grad_clip: PositiveFloat = 12.0
    loss: Literal["dice_ce"] = "dice_ce"
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr_schedule: Literal["poly", "constant"] = "poly"
    sampling: Literal["balanced", "proportional", "temperature"] = "balanced"
    sampling_temperature: PositiveFloat = 1.0
    mixed_task_batches: bool = False
    foreground_fraction: NonNegativeFloat = 0.33
    augmentation: Literal["nnunet", "none"] = "nnunet"
    augment_on: Literal["loader", "device"] = "loader"  # where augmentation runs: loader workers, or the training device
    validate_every: PositiveInt = 50
    checkpoint_every: PositiveInt = 50
    loader_workers: NonNegativeInt = 2
    # How the step runs (pipeline/train/execution.py); a CPU trains in float32, default layout, whatever the
    # first two say.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where the GPU has it, else fp16
    channels_last: bool = False  # channels-last 3D network and batches, on CUDA
    compile: bool = False  # torch.compile the network (the first steps compile it)
    seed: int = 0
    log_every: PositiveInt = 50


@dataclass(frozen=True, config=_STRICT)
class RayConfig:
    """Where and how wide training runs. `address`: None (or RAY_ADDRESS, as `ray job submit` sets
    it) or "local" starts a local Ray listening on `host` only (pipeline/common/services.py);
    "auto" joins the cluster `ray start` runs on this machine; HOST:PORT joins that cluster."""

    address: str | None = None
    host: str = "127.0.0.1"  # interface a local Ray started here listens on (0.0.0.0: all of them)
    num_workers: PositiveInt | tuple[PositiveInt, PositiveInt] = 1  # N, or [min, max]: elastic (docs/cluster.md)
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    resources_per_worker: dict[str, PositiveFloat] = dataclasses.field(default_factory=dict)  # custom, e.g. {trainer: 1}
    storage_path: str = "outputs/ray"
    max_failures: NonNegativeInt = 2
    checkpoints_to_keep: PositiveInt = 2
    elastic_resize_interval_s: PositiveFloat = 60.0  # how often an elastic run looks for room to grow
    shared_filesystem: bool = False  # local paths are on a file system every node mounts at the same path

    @field_validator("num_workers")
    @classmethod
    def _range_ordered(cls, workers: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(workers, tuple) and workers[0] > workers[1]:
            raise ValueError(f"[min, max] needs min <= max, got {list(workers)}")
        return workers

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed-size run."""
        return self.num_workers if isinstance(self.num_workers, tuple) else (self.num_workers, self.num_workers)


@dataclass(frozen=True, config=_STRICT)
class MLflowConfig:
    """Tracking; `tracking_uri=None` uses MLFLOW_TRACKING_URI or a SQLite file here. A tracking
    server is probed before a stage starts; `http_*` bound MLflow's retries (pipeline/common/tracking.py)."""

    tracking_uri: str | None = None
    experiment: str = "uniseg"
    registered_model: str | None = "uniseg"
    # MLflow's HTTP retries and per-request timeout; None: MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT, else 2 / 20
    http_max_retries: NonNegativeInt | None = None
    http_timeout_s: PositiveInt | None = None


@dataclass(frozen=True, config=_STRICT)
class FinetuneConfig:
    """Transfer a trained universal model to the task of `data.stores` (one store) and fine-tune.

    `pretrained` is a model URI (models:/NAME@ALIAS, runs:/ID/model or a model folder); None
    trains the usual network. `from_scratch` keeps the pretrained model's architecture but not
    its weights (the baseline at equal iterations). The encoder is frozen for the first
    `freeze_encoder_epochs`; the learning rate rises linearly over `warmup_epochs`; each layer
    (counted back from the heads) gets `layer_decay` times the rate of the one after it.
    """

    pretrained: str | None = None
    from_scratch: bool = False
    # Add the stores' tasks to the pretrained UniSeg (new prompt slots; its old weights and tasks frozen)
    # instead of transferring it to a single-task U-Net.
    add_task: bool = False
    freeze_encoder_epochs: NonNegativeInt = 0
    warmup_epochs: NonNegativeInt = 0
    layer_decay: PositiveFloat = 1.0  # 1.0 = off

    @field_validator("layer_decay")
    @classmethod
    def _decay_at_most_one(cls, decay: float) -> float:
        if decay > 1:
            raise ValueError(f"must be in (0, 1], got {decay}")
        return decay


@dataclass(frozen=True, config=_STRICT)
class SearchParam:
    """One search dimension: `choice` takes `values`; uniform/loguniform/randint take low/high."""

    type: Literal["choice", "uniform", "loguniform", "randint"]
    values: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.type == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty `values` list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.type} needs low < high, got low={self.low}, high={self.high}")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")


@dataclass(frozen=True, config=_STRICT)
class TuneConfig:
    """A Ray Tune search (`python -m pipeline.tune`): dotted config keys -> search dimension.

    Every trial is a short training run of this config with the sampled values; ASHA stops weak
    trials at epochs grace_period * reduction_factor**k; the best config is written to
    `best_config` (relative paths: the working directory).
    """

    space: dict[str, SearchParam] = dataclasses.field(default_factory=dict)
    num_samples: PositiveInt = 8
    max_concurrent_trials: PositiveInt | None = None  # None: as many as the Ray cluster holds (run.concurrent_runs)
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: PositiveInt = 1
    reduction_factor: PositiveFloat = 2.0
    searcher: Literal["optuna", "random"] = "optuna"
    metric: str = "dice/mean"
    mode: Literal["max", "min"] = "max"
    seed: int = 0
    trial_cpus: NonNegativeFloat = 0.0  # for each trial's driver; its Train workers reserve their own
    best_config: str = "best-config.yaml"

    @field_validator("space")
    @classmethod
    def _known_keys(cls, space: dict[str, SearchParam]) -> dict[str, SearchParam]:
        sections = typing.get_type_hints(ExperimentConfig)
        for key in space:
            section, _, leaf = key.partition(".")
            if section in ("name", "tune") or section not in sections or not leaf:
                raise ValueError(f"unknown search key {key!r}: use section.key, e.g. train.learning_rate")
            leaves = {f.name for f in dataclasses.fields(sections[section])}
            if leaf not in leaves:
                raise ValueError(f"unknown search key {key!r}: {section} has no key {leaf!r}")
        return space

    @field_validator("reduction_factor")
    @classmethod
    def _above_one(cls, factor: float) -> float:
        if factor <= 1:
            raise ValueError(f"must be > 1, got {factor}")
        return factor


@dataclass(frozen=True, config=_STRICT)
class ExperimentConfig:
    name: str = "uniseg"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    mlflow: MLflowConfig = dataclasses.field(default_factory=MLflowConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)


_ADAPTER = TypeAdapter(ExperimentConfig)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config (None: every default), apply `key.sub=value` overrides, and validate it.

    Raises ConfigError naming the file and each bad key, or `<command line>` and the key for a
    problem an override brought in.
    """
    raw = read_yaml(Path(path)) if path is not None else {}
    overridden = apply_overrides(raw, overrides)
    return config_from_dict(raw, source=str(path) if path is not None else COMMAND_LINE, overrides=overridden)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>",
                     overrides: Mapping[str, str] | None = None) -> ExperimentConfig:
    """Validate a plain dict (e.g. a Ray Tune trial config) into an ExperimentConfig; a problem
    at or under a key of `overrides` (dotted key -> the override, from `apply_overrides`) names
    the command line instead of `source`."""
    raw = read_old_amp(raw, source, overrides or {})
    try:
        # JSON mode keeps strict type checks but accepts YAML lists for tuple fields.
        return _ADAPTER.validate_json(json.dumps(raw), strict=True)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source, overrides or {})) from None


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain Python types (for Ray, MLflow params and YAML)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flatten(cfg: ExperimentConfig) -> dict[str, Any]:
    """Dotted keys to scalar values, as logged to MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            flat[prefix] = value

    walk("", to_dict(cfg))
    return flat
