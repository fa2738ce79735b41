"""Import a UniSeg reference checkpoint as one of our model folders (and register it in MLflow).

Steps: read the two nnU-Net v1 files without running their code (checkpoint.py); read our
network spec off the tensor shapes and the plans' patch size (model/reference_layout.py) and
check it against the plans' kernels and poolings; build the card from the facts file
(facts.py); rename every tensor into our network and load it with strict=True (a first
convolution for a channel count no task takes, which the reference's trainer builds regardless
and never trains, is dropped with a warning and listed in the card's metadata); write the model
folder; with a registered name, log it to MLflow as any trained model is logged.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from model.reference_layout import (
    ReferenceLayoutError,
    ReferenceNetwork,
    describe_reference,
    drop_unused_stems,
    from_reference,
)
from pipeline.common.mlflow_model import log_model_to_run
from pipeline.common.model_card import ModelCard, build_from_card, save_model_dir
from pipeline.common.tracking import TrackedRun, check_tracking_server, resolve_tracking_uri
from pipeline.import_reference.checkpoint import ReferenceCheckpoint, read_checkpoint
from pipeline.import_reference.facts import Fact, build_card, describe, load_facts

log = logging.getLogger(__name__)

DEFAULT_FACTS = Path(__file__).resolve().parents[2] / "configs" / "import_reference.yaml"
SOURCE = "UniSeg reference checkpoint (github.com/yeerwen/UniSeg)"


@dataclass(frozen=True)
class ImportResult:
    model_dir: Path
    card: ModelCard
    facts: tuple[Fact, ...]
    model_uri: str | None = None


def import_checkpoint(checkpoint: str | Path, facts_file: str | Path = DEFAULT_FACTS) -> tuple[nn.Module, ModelCard,
                                                                                           list[Fact]]:
    """Our network with the reference checkpoint's weights, its card and the card's facts."""
    ref = read_checkpoint(checkpoint)
    network_facts = describe_reference({k: tuple(v.shape) for k, v in ref.state_dict.items()},
                                       _patch_size(ref))
    _check_against_plans(network_facts, ref)
    facts = load_facts(facts_file)
    metadata = {"source": SOURCE, "checkpoint": str(ref.path), "sha256": _sha256(ref.path),
                "trainer": ref.trainer, "epochs_trained": ref.epoch, "patch_size": list(network_facts.spec.patch_size)}
    used = tuple(sorted({len(t.modalities) for t in facts.tasks}))
    state, dropped = drop_unused_stems(ref.state_dict, used)
    if dropped:
        metadata["dropped"] = dropped
        log.warning("%s: no task in %s takes %s channel(s): dropped the checkpoint's first convolution(s) for that "
                    "(%s)", ref.path, facts.path, ", ".join(str(c) for c in network_facts.stems if c not in used),
                    ", ".join(dropped))
    card, card_facts = build_card(network_facts, ref.plans, ref.stage_plans, facts, metadata)
    network = build_from_card(card)
    network.load_state_dict(from_reference(state, card.spec, used), strict=True)
    log.info("%s: %d tensors mapped, %d dropped, none left over (strict load); not read: %s", ref.path, len(state),
             len(dropped), ", ".join(ref.other_entries) or "nothing")
    return network.eval(), card, card_facts


def run(checkpoint: str | Path, out: str | Path, facts_file: str | Path = DEFAULT_FACTS,
        register: str | None = None, alias: str | None = None, tracking_uri: str | None = None,
        experiment: str = "uniseg", run_name: str = "import-reference") -> ImportResult:
    """Import `checkpoint` into the model folder `out`; with `register`, log and register it."""
    network, card, facts = import_checkpoint(checkpoint, facts_file)
    for line in describe(facts):
        log.info("%s", line)
    model_dir = save_model_dir(network, card, out)
    log.info("wrote %s", model_dir)
    uri = None
    if register:
        uri = _register(network, card, facts, register, alias, tracking_uri, experiment, run_name)
    return ImportResult(model_dir=model_dir, card=card, facts=tuple(facts), model_uri=uri)


def _register(network: nn.Module, card: ModelCard, facts: list[Fact], name: str, alias: str | None,
              tracking_uri: str | None, experiment: str, run_name: str) -> str:
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)
    run = TrackedRun.create(uri, experiment, run_name, tags={"stage": "import_reference"},
                            params={key: card.metadata[key] for key in ("checkpoint", "sha256", "epochs_trained")})
    run.log_text("\n".join(describe(facts)) + "\n", "import/facts.txt")
    model_uri = log_model_to_run(run, network, card, name, alias)
    run.end("FINISHED")
    log.info("registered %s", model_uri)
    return model_uri


def _patch_size(ref: ReferenceCheckpoint) -> tuple[int, ...]:
    patch = ref.stage_plans.get("patch_size")
    if patch is None or len(patch) != 3:
        raise ReferenceLayoutError(f"{ref.plans_path}: plans have no 3-D patch_size")
    return tuple(int(p) for p in patch)


def _check_against_plans(network: ReferenceNetwork, ref: ReferenceCheckpoint) -> None:
    """The plans' poolings and kernels must be those the tensors were built with."""
    stage = ref.stage_plans
    spec = network.spec
    expected: dict[str, Any] = {"pool_op_kernel_sizes": [list(s) for s in spec.strides[1:]],
                                "conv_kernel_sizes": [list(k) for k in spec.kernels]}
    for key, from_tensors in expected.items():
        planned = stage.get(key)
        if planned is not None and [[int(v) for v in entry] for entry in planned] != from_tensors:
            raise ReferenceLayoutError(f"{ref.plans_path}: plans' {key} {[list(map(int, e)) for e in planned]} "
                                       f"disagree with the checkpoint's tensors ({from_tensors})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
