"""The per-case tasks (one Dask or Ray task each) and their outcome, which never raises.

`plan_step` checks and summarises a training case for the plan; `ingest_step` checks,
preprocesses (pipeline.common.geometry) and writes one case. `guarded` turns any failure into
an outcome holding one "<file>: <problem>" line per problem, so the other cases go on; a failure
to write (a full disk, a read-only store) names the store, not the source file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.common import geometry
from pipeline.ingest import writer
from pipeline.ingest.checks import CaseError, load_case
from pipeline.ingest.dataset import CaseSource, DatasetSpec, case_rng
from pipeline.ingest.plan import CaseSummary, Plan, summarize_case

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseOutcome:
    case_id: str
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    summary: CaseSummary | None = None  # plan pass only
    crashed: bool = False  # failed for another reason than its input (a full disk, a bug)

    @property
    def ok(self) -> bool:
        return not self.problems


class StoreWriteError(Exception):
    """Writing a case to the store failed; the message names the store and the case."""


@dataclass(frozen=True)
class WriteTarget:
    """Where and how a case is written (plain values: travels to Dask and Ray workers)."""

    uri: str
    storage_options: dict[str, Any] | None
    chunk_size: tuple[int, int, int]
    max_class_locations: int
    recipe: str  # id of everything that shapes the stored arrays (plan + write options)


def guarded(step: Callable[..., CaseOutcome], case: CaseSource, *args: Any) -> CaseOutcome:
    """Run a per-case step; failures become the outcome's problems instead of exceptions."""
    try:
        return step(case, *args)
    except CaseError as err:
        return CaseOutcome(case.case_id, problems=err.problems)
    except StoreWriteError as err:
        return CaseOutcome(case.case_id, problems=(str(err),), crashed=True)
    except Exception as err:  # a task must report, not kill the run: any failure is this case's
        log.exception("case %s failed", case.case_id)
        message = " ".join(str(err).split())
        return CaseOutcome(case.case_id, problems=(f"{case.images[0]}: {type(err).__name__}: {message}",),
                           crashed=True)


def plan_step(case: CaseSource, spec: DatasetSpec, statistics: tuple[bool, ...]) -> CaseOutcome:
    return CaseOutcome(case.case_id, summary=summarize_case(case, spec, statistics))


def ingest_step(
    case: CaseSource, spec: DatasetSpec, plan: Plan, target: WriteTarget, fingerprint: str, stat: str
) -> CaseOutcome:
    loaded = load_case(case, len(spec.modalities), set(spec.labels))
    image, label, meta = geometry.preprocess_case(
        loaded.image, loaded.affine, loaded.label, plan.target_spacing, plan.normalization,
        plan.image_order, plan.label_resampling,
    )
    locations = None if label is None else class_locations(
        label, len(spec.labels), target.max_class_locations, case_rng(case.case_id)
    )
    attrs = {
        "meta": meta.to_dict(),
        "spacing": list(meta.spacing),
        "source": [os.path.relpath(p, spec.root) for p in case.files],
        "source_fingerprint": fingerprint,
        "source_stat": stat,
        "recipe": target.recipe,
        "warnings": list(loaded.warnings),
    }
    try:
        writer.write_case(target.uri, target.storage_options, case.case_id, (image, label), attrs,
                          target.chunk_size, class_locations=locations)
    except OSError as err:
        raise StoreWriteError(f"{target.uri}: cannot write case {case.case_id}: {err.strerror or err}") from None
    return CaseOutcome(case.case_id, warnings=loaded.warnings)


def class_locations(label: np.ndarray, num_classes: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `cap` random voxels of each foreground class, as (N, 4) int32 rows (class, z, y, x)
    sorted by class (the store's `class_locations` array)."""
    rows = [np.zeros((0, 4), dtype=np.int32)]
    for c in range(1, num_classes):
        voxels = np.argwhere(label == c)
        if len(voxels) > cap:
            voxels = voxels[np.sort(rng.choice(len(voxels), size=cap, replace=False))]
        rows.append(np.column_stack([np.full(len(voxels), c), voxels]).astype(np.int32))
    return np.concatenate(rows)
