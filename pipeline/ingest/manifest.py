"""Build a store's manifest from the cases that were ingested, with their folds (`pipeline.ingest.split`)."""

from __future__ import annotations

from pipeline.common.store import StoreManifest
from pipeline.ingest.dataset import CaseSource, DatasetSpec
from pipeline.ingest.plan import Plan


def build_manifest(
    spec: DatasetSpec,
    plan: Plan,
    cases: list[CaseSource],
    fingerprints: dict[str, str],
    folds: list[list[str]],
) -> StoreManifest:
    """The manifest of a store holding exactly `cases` (the successfully ingested ones), whose
    labelled cases fall into `folds`; fold 0 is the validation split."""
    labelled = [c.case_id for c in cases if not c.is_test]
    manifest = StoreManifest(
        task_name=spec.task_name,
        modalities=spec.modalities,
        labels=dict(spec.labels),
        target_spacing=plan.target_spacing,
        normalization=plan.normalization,
        cases={c.case_id: fingerprints[c.case_id] for c in sorted(cases, key=lambda c: c.case_id)},
        split={"train": sorted(labelled), "validation": []},
        folds=folds,
        test_cases=tuple(sorted(c.case_id for c in cases if c.is_test)),
        image_order=plan.image_order,
        label_resampling=plan.label_resampling,
        dataset=spec.name,
        source_root=str(spec.root.resolve()),
    )
    return manifest.with_fold(0)
