"""nnU-Net v2 as real_accuracy.py's peer, run from its own venv (`--peers`): a small trainer
subclass that sets epochs and iterations, its plan edited to our network and patch with our fold-0
split, training and test-set prediction on the CPU, the predictions scored as ours are."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.accuracy_runs import test_dice
from benchmarks.processes import process_tree_cost, run_logged
from pipeline.common.store import TaskStore

TRAINER = "nnUNetTrainer_RealAccuracy"
_TRAINER_CODE = '''"""Written by benchmarks/real_accuracy.py: epochs and iterations from the environment, one
torch thread, one validation batch per epoch, no final validation (the benchmark scores the test set)."""
import os

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_RealAccuracy(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ["REAL_ACCURACY_EPOCHS"])
        self.num_iterations_per_epoch = int(os.environ["REAL_ACCURACY_ITERATIONS"])
        self.num_val_iterations_per_epoch = 1

    def on_train_start(self):
        torch.set_num_threads(int(os.environ.get("REAL_ACCURACY_THREADS", "1")))
        super().on_train_start()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped: benchmarks/real_accuracy.py scores the test cases")
'''


def nnunet_env(work: Path, epochs: int = 1, iterations: int = 1) -> dict[str, str]:
    return dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "nnunet" / "preprocessed"),
                nnUNet_results=str(work / "nnunet" / "results"), nnUNet_n_proc_DA="1", nnUNet_compile="false",
                REAL_ACCURACY_EPOCHS=str(epochs), REAL_ACCURACY_ITERATIONS=str(iterations), REAL_ACCURACY_THREADS="1")


def install_trainer(peers: Path) -> None:
    """Write nnUNetTrainer_RealAccuracy where nnU-Net looks trainers up by name."""
    code = "import nnunetv2, pathlib; print(pathlib.Path(nnunetv2.__file__).parent)"
    package = Path(subprocess.run([str(peers / "bin" / "python"), "-c", code], check=True, capture_output=True,
                                  text=True).stdout.strip())
    target = package / "training" / "nnUNetTrainer" / "variants" / "benchmarking" / f"{TRAINER}.py"
    if not target.is_file() or target.read_text() != _TRAINER_CODE:
        target.write_text(_TRAINER_CODE)


def dataset_id(task: str) -> str:
    return task.removeprefix("Dataset").split("_", 1)[0]


def prepare_nnunet(work: Path, peers: Path, task: str, store: Path, spec: Any, batch_size: int) -> dict[str, Any]:
    """Plan and preprocess one task, give it our fold-0 split, edit its plan to our network and patch."""
    folder = work / "nnunet" / "preprocessed" / task
    plans_file = folder / "nnUNetPlans.json"
    if not plans_file.is_file():
        run_logged([peers / "bin" / "nnUNetv2_plan_and_preprocess", "-d", dataset_id(task), "-c", "3d_fullres",
                    "-np", "1", "-npfp", "1"], env=nnunet_env(work), log_file=work / "logs" / f"nnunet-plan-{task}.log")
    split = TaskStore.open(str(store)).manifest.split
    (folder / "splits_final.json").write_text(json.dumps([{"train": split["train"], "val": split["validation"]}]))
    plans = json.loads(plans_file.read_text())
    configuration = plans["configurations"]["3d_fullres"]
    order = plans["transpose_forward"]
    n = len(spec.features)
    configuration["patch_size"] = [spec.patch_size[i] for i in order]
    configuration["batch_size"] = batch_size
    configuration["architecture"]["arch_kwargs"].update(
        n_stages=n, features_per_stage=list(spec.features),
        kernel_sizes=[[k[i] for i in order] for k in spec.kernels],
        strides=[[s[i] for i in order] for s in spec.strides],
        n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1))
    plans_file.write_text(json.dumps(plans, indent=2))
    return {"spacing": configuration["spacing"], "transpose_forward": order,
            "normalization": configuration["normalization_schemes"]}


def train_and_score_nnunet(work: Path, peers: Path, task: str, budget: int, args: argparse.Namespace,
                           labels: Sequence[str]) -> dict[str, Any]:
    epochs = max(1, budget // args.iterations)
    env = nnunet_env(work, epochs, args.iterations)
    results = work / "nnunet" / "results" / task / f"{TRAINER}__nnUNetPlans__3d_fullres"
    shutil.rmtree(results, ignore_errors=True)
    name = f"nnunet-{task}-{budget}-s{args.seed}"
    with process_tree_cost() as cost:
        run_logged([peers / "bin" / "nnUNetv2_train", dataset_id(task), "3d_fullres", "0", "-tr", TRAINER,
                    "-device", "cpu"], env=env, log_file=work / "logs" / f"{name}.log")
    out = work / "predictions" / name
    shutil.rmtree(out, ignore_errors=True)
    run_logged([peers / "bin" / "nnUNetv2_predict", "-i", work / "raw" / task / "imagesTs", "-o", out,
                "-d", dataset_id(task), "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-chk", "checkpoint_final.pth",
                "--disable_tta", "-device", "cpu", "-npp", "1", "-nps", "1"],
               env=env, log_file=work / "logs" / f"{name}-predict.log")
    return {"name": name, "wall_s": cost.wall_s, "cpu_s": cost.cpu_s,
            "dice": {task: test_dice(out, work / "raw" / task, labels)}}
