"""One line of help per config key (what it does, its unit, when to change it), printed by every
stage's --help after the key's type and default (`describe_keys`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from pipeline.common.config import ExperimentConfig

KEY_HELP: dict[str, str] = {
    "name": "the run's name: its folder under ray.storage_path and its MLflow run name; change per experiment",
    # data
    "data.stores": "Zarr task stores written by ingest (paths or s3:// URIs), one per task trained together",
    "data.fold": "cross-validation fold held out for validation; None: the stores' split (fold 0)",
    "data.allow_incomplete_stores": "train on a store whose last ingest failed or left failed/stale cases (debugging only)",
    # ingest
    "ingest.target_spacing": "(z, y, x) voxel spacing in mm to resample to; None: planned from the dataset (nnU-Net's rule)",
    "ingest.ct_normalization": "CT intensity scheme: nnU-Net's percentile clip + z-score, or UniSeg's fixed window",
    "ingest.image_order": "spline order of image resampling (3: nnU-Net's cubic; 1: linear, faster, for quick tests)",
    "ingest.label_resampling": "labels resampled by nearest neighbour, or per class linearly then argmax (nnU-Net's, smoother)",
    "ingest.folds": "cross-validation folds per store (at least 2), stable per case; fold 0 validates",
    "ingest.split_seed": "seed of the fold draw; change only to draw different folds",
    "ingest.overwrite": "rewrite a store's cases even when their inputs did not change",
    "ingest.scheduler": "address of an existing Dask scheduler, or synchronous|threads (in-process); None: a local cluster",
    "ingest.on_ray": "run the ingest tasks on Ray (Dask on Ray) instead of a Dask cluster",
    "ingest.host": "interface the local Dask cluster, its dashboard and a local Ray listen on (0.0.0.0: every one)",
    "ingest.num_workers": "Dask workers of the local cluster; None: one per CPU core",
    "ingest.chunk_size": "(z, y, x) voxels per Zarr chunk; 32^3 reads faster than 64^3 for patch sampling",
    "ingest.max_class_locations": "voxel positions stored per class for foreground oversampling; raise for tiny structures",
    "ingest.change_detection": "how a case is judged unchanged: hash the files (content) or trust size + mtime (stat, faster)",
    # model
    "model.preset": "network preset (tiny: tests, cpu: CPU runs, uniseg-paper: the paper's); None: planned from the stores",
    "model.memory_gb": "GPU memory budget in GB at batch 2 that a planned network must fit (nnU-Net's default 8)",
    "model.architecture": "uniseg (task prompt), multihead (a head per task) or dodnet (dynamic head): the paper's comparisons",
    "model.patch_size": "(z, y, x) training patch in voxels; None: the preset's or the plan's",
    "model.features": "feature channels per encoder stage; None: the preset's or the plan's",
    "model.prompt_channels": "channels of each task's learned prompt (UniSeg: 1)",
    "model.prompt_size": "(z, y, x) size of the task prompt; None: the bottleneck's size at the patch",
    "model.fuse_channels": "channels of the prompt-fusion block; None: the preset's (82, the paper's)",
    "model.deep_supervision": "loss on every decoder stage's output (nnU-Net's); off only for ablations",
    "model.prompt_last_stage": "the task prompt also enters the last decoder stage (UniSeg's code, not the paper)",
    # train
    "train.epochs": "training epochs (UniSeg: 1000); fewer for tests and quick looks",
    "train.iterations_per_epoch": "optimiser steps per epoch (nnU-Net: 250, UniSeg: 550)",
    "train.batch_size": "patches per step on each worker (the paper: 2)",
    "train.learning_rate": "initial learning rate (SGD: 1e-2; AdamW wants about 1e-3 or less)",
    "train.momentum": "SGD Nesterov momentum (nnU-Net: 0.99)",
    "train.weight_decay": "L2 weight decay (nnU-Net: 3e-5)",
    "train.poly_exponent": "exponent of the poly learning-rate decay over the run (nnU-Net: 0.9)",
    "train.grad_clip": "gradient norm clipped to this value (nnU-Net: 12)",
    "train.loss": "training loss: Dice + cross-entropy (the only one)",
    "train.optimizer": "SGD Nesterov (the paper's) or AdamW",
    "train.lr_schedule": "poly decay (the paper's) or a constant rate (short tuning trials)",
    "train.sampling": "task per sample: balanced (equal), proportional (to cases) or temperature (between the two)",
    "train.sampling_temperature": "temperature of task sampling: 1 proportional, higher towards balanced",
    "train.mixed_task_batches": "a batch may mix tasks (UniSeg's batches hold one task each)",
    "train.foreground_fraction": "fraction of patches centred on a foreground voxel (nnU-Net: 0.33)",
    "train.augmentation": "nnU-Net's spatial and intensity augmentation, or none (tests, benchmarks)",
    "train.augment_on": "where augmentation runs: the loader workers (CPU) or the training device (when CPUs are short)",
    "train.validate_every": "epochs between validations (Dice per class logged to MLflow)",
    "train.checkpoint_every": "epochs between checkpoints; lower loses less on a failure, costs storage writes",
    "train.loader_workers": "data-loader processes per training worker; raise while the step waits for data",
    "train.precision": "step precision on a GPU: auto (bf16 where it has it, else fp16), bf16, fp16 or fp32; CPU: fp32",
    "train.channels_last": "channels-last 3D layout on CUDA (can be faster with cuDNN; measure before turning on)",
    "train.compile": "torch.compile the network (the first steps compile it; pays off on long GPU runs)",
    "train.seed": "seed of weights, sampling and augmentation",
    "train.log_every": "iterations between training-metric logs to MLflow",
    # ray
    "ray.address": "Ray cluster: None or local starts one here, auto joins `ray start` here, HOST:PORT joins that one",
    "ray.host": "interface a local Ray started here listens on (0.0.0.0: every one, for other nodes)",
    "ray.num_workers": "training workers (data parallel), or [min, max] for an elastic run (docs/cluster.md)",
    "ray.use_gpu": "one GPU per training worker",
    "ray.cpus_per_worker": "CPUs reserved per training worker (its loader processes run inside them)",
    "ray.resources_per_worker": "custom Ray resources per worker, e.g. {trainer: 1} to pin workers to labelled nodes",
    "ray.storage_path": "where runs, checkpoints and run records live (local path, or s3:// on a cluster)",
    "ray.max_failures": "times Ray Train restarts lost workers from the last checkpoint before the run fails",
    "ray.checkpoints_to_keep": "checkpoints kept per run (older ones deleted)",
    "ray.elastic_resize_interval_s": "seconds between an elastic run's looks for room to grow",
    "ray.shared_filesystem": "local paths are on a file system every node mounts at the same path (NFS); else refused on a cluster",
    # mlflow
    "mlflow.tracking_uri": "MLflow tracking URI; None: MLFLOW_TRACKING_URI, else a SQLite file here",
    "mlflow.experiment": "MLflow experiment the runs go to",
    "mlflow.registered_model": "registered model name the final model is registered under; None: logged, not registered",
    "mlflow.http_max_retries": "MLflow HTTP retries; None: MLFLOW_HTTP_REQUEST_MAX_RETRIES, else 2",
    "mlflow.http_timeout_s": "MLflow per-request timeout in seconds; None: MLFLOW_HTTP_REQUEST_TIMEOUT, else 20",
    # finetune
    "finetune.pretrained": "model to start from (models:/NAME@ALIAS, runs:/ID/model or a model folder); None: train as usual",
    "finetune.from_scratch": "keep the pretrained architecture but not its weights (the baseline at equal iterations)",
    "finetune.add_task": "add the stores' tasks to the pretrained UniSeg (new prompts; old weights and tasks frozen) instead of a single-task U-Net",
    "finetune.freeze_encoder_epochs": "epochs the encoder stays frozen at the start (0: never)",
    "finetune.warmup_epochs": "epochs over which the learning rate rises linearly to train.learning_rate",
    "finetune.layer_decay": "each layer, counted back from the heads, gets this times the next one's rate (1.0: off)",
    # tune
    "tune.space": "dotted config key -> search dimension (choice values, or uniform/loguniform/randint low, high)",
    "tune.num_samples": "trials of the search",
    "tune.max_concurrent_trials": "trials at once; None: as many as the Ray cluster holds",
    "tune.scheduler": "asha stops weak trials early; fifo runs every trial to the end",
    "tune.grace_period": "epochs every trial runs before ASHA may stop it",
    "tune.reduction_factor": "ASHA keeps 1/this of the trials at each rung (above 1)",
    "tune.searcher": "optuna (TPE) or random sampling of the space",
    "tune.metric": "MLflow metric the search ranks trials by",
    "tune.mode": "whether a higher (max) or lower (min) metric is better",
    "tune.seed": "seed of the searcher",
    "tune.trial_cpus": "CPUs reserved for each trial's driver; its Train workers reserve their own",
    "tune.best_config": "file the best trial's config is written to (relative: the working directory)",
}


def describe_keys(sections: Sequence[str]) -> str:
    """Every key of the given config sections with its type, default and one line of help (for --help)."""
    def lines(prefix: str, holder: Any, field: dataclasses.Field) -> list[str]:
        value = getattr(holder, field.name)
        if dataclasses.is_dataclass(value):
            return [line for sub in dataclasses.fields(value) for line in lines(f"{prefix}{field.name}.", value, sub)]
        key = f"{prefix}{field.name}"
        return [f"  {key}: {field.type} = {value!r}\n      {KEY_HELP[key]}"]

    defaults = ExperimentConfig()
    fields = {f.name: f for f in dataclasses.fields(defaults)}
    return "\n".join(line for section in sections for line in lines("", defaults, fields[section]))
