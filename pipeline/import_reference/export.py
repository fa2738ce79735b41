"""Export one of our models in the UniSeg reference's checkpoint layout: `python -m pipeline.import_reference.export`.

`python -m pipeline.import_reference.export --model URI -o FOLDER [--name model_final_checkpoint]`

Writes FOLDER/NAME.model and FOLDER/NAME.model.pkl as nnU-Net v1 writes them (the reference's
state-dict names, plans with the network's patch, poolings and kernels, trainer name
UniSeg_Trainer), and FOLDER/facts.yaml, the task facts the checkpoint cannot hold, so that
`python -m pipeline.import_reference FOLDER/NAME.model --facts FOLDER/facts.yaml` gives back the
same network and card. With the reference's code, the checkpoint runs as its own models do (its
README's "Prediction on New Data"); its trainer hard-codes the 11-task table (`task_class`,
`total_task_num`), so another task table needs those edited, as its README says.

Only networks the reference's code can build are exported: UniSeg with the nnU-Net v1 decoder
(the uniseg-paper preset), widths doubling from the first up to 320, FUSE width
(bottleneck + tasks) // 4 and a prompt of patch // (16, 32, 32). Anything else is refused with
the reason. Exit status: 0 written; 2 a model that cannot be exported or not found; 1 other failures.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch import nn

from model.reference_layout import PROMPT_DIVISORS, ReferenceLayoutError, check_reference_compatible, to_reference
from pipeline.common.cli import run_stage, stage_parser
from pipeline.common.logs import setup_logging
from pipeline.common.mlflow_model import load_model
from pipeline.common.model_card import ModelCard
from pipeline.common.tracking import TrackingUnavailable, check_model_tracking
from pipeline.import_reference.checkpoint import write_checkpoint

log = logging.getLogger("pipeline.import_reference.export")

MAX_FEATURES = 320  # nnU-Net v1's Generic_UNet.MAX_NUM_FILTERS_3D
REFERENCE_TASK_COUNT = 11  # what the reference's UniSeg_Trainer hard-codes
FACTS_FILE = "facts.yaml"


def check_exportable(card: ModelCard) -> None:
    """ReferenceLayoutError naming each way the reference's code would build another network."""
    spec = card.spec
    check_reference_compatible(spec)
    problems = []
    widths = tuple(min(spec.features[0] * 2**d, MAX_FEATURES) for d in range(len(spec.features)))
    if spec.features != widths:
        problems.append(f"features {spec.features}: the reference doubles from the first up to {MAX_FEATURES}: {widths}")
    tasks = len(card.tasks)
    if spec.fuse_channels != (spec.features[-1] + tasks) // 4:
        problems.append(f"fuse_channels {spec.fuse_channels}: the reference's is (bottleneck + tasks) // 4 = "
                        f"{(spec.features[-1] + tasks) // 4}")
    reference_prompt = tuple(p // d for p, d in zip(spec.patch_size, PROMPT_DIVISORS))
    if spec.resolved_prompt_size != reference_prompt:
        problems.append(f"prompt {spec.resolved_prompt_size}: the reference sizes it as patch {spec.patch_size} "
                        f"// {PROMPT_DIVISORS} = {reference_prompt}")
    if problems:
        raise ReferenceLayoutError("the reference's code builds another network: " + "; ".join(problems))


def reference_plans(card: ModelCard, folder: Path) -> dict[str, Any]:
    """Plans with the keys and types of the reference's merged plans (merge_each_sub_dataet.py),
    for this network: what its trainer, preprocessor and predictor read."""
    spec = card.spec
    pools = [list(s) for s in spec.strides[1:]]
    max_channels = max(t.in_channels for t in card.tasks)
    modalities = {c: sorted({t.modalities[c] for t in card.tasks if c < t.in_channels}) for c in range(max_channels)}
    spacing = np.array(card.tasks[0].target_spacing, dtype=float)
    stage = {"batch_size": 2, "num_pool_per_axis": [sum(1 for p in pools if p[a] > 1) for a in range(3)],
             "patch_size": np.array(spec.patch_size), "median_patient_size_in_voxels": np.array(spec.patch_size),
             "current_spacing": spacing, "original_spacing": spacing, "do_dummy_2D_data_aug": False,
             "pool_op_kernel_sizes": pools, "conv_kernel_sizes": [list(k) for k in spec.kernels]}
    classes = list(range(1, max(t.num_classes for t in card.tasks)))
    return {
        "num_stages": 1, "num_modalities": max_channels, "modalities": modalities, "normalization_schemes": None,
        "dataset_properties": {"all_classes": classes, "modalities": modalities, "intensityproperties": None},
        "list_of_npz_files": [], "original_spacings": [], "original_sizes": [],
        "preprocessed_data_folder": str(folder), "num_classes": len(classes), "all_classes": classes,
        "base_num_features": spec.features[0],
        "use_mask_for_norm": OrderedDict((c, False) for c in range(max_channels)),
        "keep_only_largest_region": None, "min_region_size_per_class": None, "min_size_per_class": None,
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "data_identifier": "DoDNetData_plans",
        "plans_per_stage": {0: stage}, "preprocessor_name": "DoDNetPreprocessor", "conv_per_stage": 2,
    }


def facts_yaml(card: ModelCard) -> str:
    """The facts file that gives the card's tasks back on import."""
    tasks = [{"name": t.name, "labels": {int(k): v for k, v in t.labels.items()}, "modalities": list(t.modalities),
              "target_spacing": [float(s) for s in t.target_spacing],
              "normalization": [dict(n) for n in t.normalization], "image_order": t.image_order}
             for t in card.tasks]
    header = ("# Task facts of an exported model, in task-id order; import with\n"
              "# python -m pipeline.import_reference NAME.model --facts facts.yaml\n")
    return header + yaml.safe_dump({"tasks": tasks}, sort_keys=False)


def export(network: nn.Module, card: ModelCard, folder: str | Path, name: str = "model_final_checkpoint") -> Path:
    """Write the reference-layout checkpoint of `network` (and facts.yaml) into `folder`."""
    if card.members:
        raise ReferenceLayoutError("a fold ensemble has several networks; the reference's checkpoint holds one "
                                   "(export a member's model folder)")
    check_exportable(card)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_reference(network.state_dict(), card.spec)
    epoch = int(card.metadata.get("epochs_trained") or 0)
    path = write_checkpoint(folder / f"{name}.model", state, reference_plans(card, folder), epoch=epoch,
                            init_folder=folder)
    (folder / FACTS_FILE).write_text(facts_yaml(card))
    if len(card.tasks) != REFERENCE_TASK_COUNT:
        log.warning("%d tasks: the reference's UniSeg_Trainer hard-codes %d (edit its task, task_class and "
                    "total_task_num to load this checkpoint with its code)", len(card.tasks), REFERENCE_TASK_COUNT)
    log.info("wrote %s, its .pkl and %s", path, folder / FACTS_FILE)
    return path


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = stage_parser("pipeline.import_reference.export", __doc__)
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model "
                                                        "or a model folder")
    parser.add_argument("-o", "--out", required=True, metavar="FOLDER", help="folder to write the checkpoint into")
    parser.add_argument("--name", default="model_final_checkpoint", help="file name stem (default: %(default)s)")
    args = parser.parse_args(argv)

    def work() -> None:
        check_model_tracking(args.model)
        network, card = load_model(args.model)
        export(network, card, args.out, args.name)

    return run_stage(work, log, "export", (FileNotFoundError, ReferenceLayoutError, TrackingUnavailable))


if __name__ == "__main__":
    sys.exit(main())
