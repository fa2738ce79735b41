"""Build a store's manifest from the cases that were ingested, with a seeded train/validation split."""

from __future__ import annotations

import numpy as np

from pipeline.common.store import StoreManifest
from pipeline.ingest.dataset import CaseSource, DatasetSpec
from pipeline.ingest.plan import Plan


def split_cases(case_ids: list[str], validation_fraction: float, seed: int) -> dict[str, list[str]]:
    """A seeded random split of the labelled cases; at least one case on each side when the
    fraction is > 0 and there are two cases or more."""
    ids = sorted(case_ids)
    count = round(len(ids) * validation_fraction)
    if validation_fraction > 0 and len(ids) >= 2:
        count = min(max(count, 1), len(ids) - 1)
    order = np.random.default_rng(seed & 0xFFFFFFFF).permutation(len(ids))
    validation = {ids[i] for i in order[:count]}
    return {"train": [c for c in ids if c not in validation], "validation": sorted(validation)}


def build_manifest(
    spec: DatasetSpec,
    plan: Plan,
    cases: list[CaseSource],
    fingerprints: dict[str, str],
    validation_fraction: float,
    seed: int,
) -> StoreManifest:
    """The manifest of a store holding exactly `cases` (the successfully ingested ones)."""
    labelled = [c.case_id for c in cases if not c.is_test]
    return StoreManifest(
        task_name=spec.task_name,
        modalities=spec.modalities,
        labels=dict(spec.labels),
        target_spacing=plan.target_spacing,
        normalization=plan.normalization,
        cases={c.case_id: fingerprints[c.case_id] for c in sorted(cases, key=lambda c: c.case_id)},
        split=split_cases(labelled, validation_fraction, seed),
        test_cases=tuple(sorted(c.case_id for c in cases if c.is_test)),
        image_order=plan.image_order,
        label_resampling=plan.label_resampling,
        dataset=spec.name,
        source_root=str(spec.root.resolve()),
    )
