"""Ingest orchestration: for each dataset, list cases, plan (cached), ingest what changed, write
the manifest last; report every problem and never stop at a bad case.

Resume rule: a case is skipped when its group is complete and was written from the same source
fingerprint with the same recipe (plan + write options); the plan itself is reused while the
training cases' fingerprints and the planning options are unchanged. A re-run with nothing
changed writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
from dask.delayed import Delayed

from pipeline.common.config import IngestConfig
from pipeline.common.store import FORMAT_VERSION, StoreError, StoreManifest
from pipeline.ingest import writer
from pipeline.ingest.case import CaseOutcome, WriteTarget, guarded, ingest_step, plan_step
from pipeline.ingest.dataset import CaseSource, DatasetError, DatasetSpec, read_dataset, source_fingerprint
from pipeline.ingest.executor import Compute, executor
from pipeline.ingest.manifest import build_manifest
from pipeline.ingest.split import store_folds, with_test_labels
from pipeline.ingest.plan import Plan, make_plan, needs_statistics

log = logging.getLogger(__name__)


@dataclass
class DatasetReport:
    source: str
    store: str = ""
    ingested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None  # the whole dataset failed

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed

    def summary(self) -> str:
        if self.error is not None:
            return f"{self.source}: FAILED: {self.error}"
        return (f"{self.source} -> {self.store}: {len(self.ingested)} ingested, {len(self.skipped)} unchanged, "
                f"{len(self.failed)} failed, {len(self.warnings)} warnings")


@dataclass
class IngestReport:
    datasets: list[DatasetReport]

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.datasets)


def store_uri(out: str, dataset_name: str) -> str:
    """`<out>/<dataset>.zarr` for a local folder or an fsspec URL."""
    if "://" in out:
        return f"{out.rstrip('/')}/{dataset_name}.zarr"
    return str(Path(out) / f"{dataset_name}.zarr")


def run(
    sources: Sequence[str | Path], out: str, cfg: IngestConfig, storage_options: dict[str, Any] | None = None
) -> IngestReport:
    """Ingest each source dataset into `<out>/<folder name>.zarr`; see the module docstring."""
    with executor(cfg) as compute:
        reports = [ingest_dataset(Path(s), out, cfg, storage_options, compute) for s in sources]
    for report in reports:
        (log.info if report.ok else log.error)(report.summary())
    return IngestReport(reports)


def ingest_dataset(
    source: Path, out: str, cfg: IngestConfig, storage_options: dict[str, Any] | None, compute: Compute
) -> DatasetReport:
    report = DatasetReport(str(source))
    try:
        spec = with_test_labels(read_dataset(source))
        report.store = store_uri(out, spec.name)
        root = writer.open_store(report.store, storage_options, cfg.overwrite)
    except (DatasetError, StoreError) as err:
        log.error("%s", err)
        report.error = str(err)
        return report
    fingerprints = {c.case_id: source_fingerprint(c) for c in spec.cases}
    plan = _plan(spec, root, cfg, fingerprints, compute, report)
    if plan is None:
        return report
    target = WriteTarget(report.store, storage_options, cfg.chunk_size, cfg.max_class_locations, _recipe(plan, cfg))
    candidates = [c for c in spec.cases if c.case_id not in report.failed]
    todo = [c for c in candidates if not _is_current(root, c.case_id, fingerprints[c.case_id], target.recipe)]
    report.skipped = sorted({c.case_id for c in candidates} - {c.case_id for c in todo})
    if todo:
        writer.clear_manifest(root)
        _ingest_cases(spec, plan, target, todo, fingerprints, compute, report)
    done = [c for c in spec.cases if c.case_id not in report.failed]
    folds = store_folds(root, spec.name, [c.case_id for c in done if not c.is_test], cfg.folds, cfg.split_seed)
    _commit(root, build_manifest(spec, plan, done, fingerprints, folds), report.store)
    return report


def _ingest_cases(
    spec: DatasetSpec,
    plan: Plan,
    target: WriteTarget,
    cases: list[CaseSource],
    fingerprints: dict[str, str],
    compute: Compute,
    report: DatasetReport,
) -> None:
    """The case pass: one task per case; the shared inputs are one graph node, not one copy per task."""
    spec_node, plan_node, target_node = _shared((spec, plan, target), key=f"inputs-{spec.name}")
    tasks = [_task(guarded, ingest_step, c, spec_node, plan_node, target_node, fingerprints[c.case_id],
                   key=f"ingest-{spec.name}-{c.case_id}") for c in cases]
    _collect(compute(tasks), report)


def _commit(root: Any, manifest: StoreManifest, uri: str) -> None:
    """Remove cases outside the manifest (failed, gone from the source), then write the manifest.

    The old manifest is cleared first, so that no reader ever sees a manifest naming a missing case.
    """
    stale = writer.stale_cases(root, set(manifest.cases))
    if not stale and writer.read_manifest(root) == manifest.to_dict():
        return
    writer.clear_manifest(root)
    for case_id in stale:
        writer.remove_case(root, case_id)
        log.info("%s: removed case %s (failed or no longer in the source)", uri, case_id)
    writer.write_manifest(root, manifest)


def _plan(
    spec: DatasetSpec,
    root: Any,
    cfg: IngestConfig,
    fingerprints: dict[str, str],
    compute: Compute,
    report: DatasetReport,
) -> Plan | None:
    """The cached plan when its inputs are unchanged, else the plan pass (a Dask reduction)."""
    inputs = _plan_inputs(spec, cfg, fingerprints)
    cached = writer.read_plan(root)
    if cached is not None and cached.get("inputs") == inputs:
        return Plan.from_dict(cached["plan"])
    statistics = needs_statistics(spec, cfg)
    [shared_spec] = _shared((spec,), key=f"spec-{spec.name}")
    outcomes = [_task(guarded, plan_step, c, shared_spec, statistics, key=f"plan-{spec.name}-{c.case_id}")
                for c in spec.train_cases]
    reduced = _task(_reduce_plan, outcomes, spec, cfg, key=f"plan-{spec.name}")
    plan, *results = compute([reduced, *outcomes])
    _collect(results, report, ingested=False)
    if isinstance(plan, str):
        log.error("%s", plan)
        report.error = plan
        return None
    writer.write_plan(root, {"inputs": inputs, "plan": plan.to_dict()})
    log.info("%s: target spacing (z, y, x) %s, normalisation %s", spec.name,
             tuple(round(s, 4) for s in plan.target_spacing), [n.scheme for n in plan.normalization])
    return plan


def _reduce_plan(outcomes: list[CaseOutcome], spec: DatasetSpec, cfg: IngestConfig) -> Plan | str:
    """The plan, or why there is none (a message, so that no executor has to carry an error)."""
    try:
        return make_plan([o.summary for o in outcomes if o.ok], spec, cfg)
    except ValueError as err:
        return str(err)


def _collect(outcomes: list[CaseOutcome], report: DatasetReport, ingested: bool = True) -> None:
    for outcome in outcomes:
        for problem in outcome.problems:
            log.error("%s", problem)
        if not outcome.ok:
            report.failed[outcome.case_id] = outcome.problems
        elif ingested:
            report.ingested.append(outcome.case_id)
            for warning in outcome.warnings:
                log.warning("%s", warning)
            report.warnings.extend(outcome.warnings)


def _task(fn: Any, *args: Any, key: str) -> Delayed:
    return dask.delayed(fn, pure=False)(*args, dask_key_name=key)


def _shared(values: tuple, key: str) -> list[Delayed]:
    """Values every task needs, as one graph node (sent once per worker, not embedded per task)."""
    node = dask.delayed(values, name=key, traverse=False)
    return [node[i] for i in range(len(values))]


def _is_current(root: Any, case_id: str, fingerprint: str, recipe: str) -> bool:
    attrs = writer.completed_case_attrs(root, case_id)
    return attrs is not None and attrs.get("source_fingerprint") == fingerprint and attrs.get("recipe") == recipe


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _plan_inputs(spec: DatasetSpec, cfg: IngestConfig, fingerprints: dict[str, str]) -> str:
    return _digest({
        "format_version": FORMAT_VERSION,
        "modalities": spec.modalities,
        "labels": spec.labels,
        "cases": {c.case_id: fingerprints[c.case_id] for c in spec.train_cases},
        "options": [cfg.target_spacing, cfg.ct_normalization, cfg.image_order, cfg.label_resampling],
    })


def _recipe(plan: Plan, cfg: IngestConfig) -> str:
    return _digest([FORMAT_VERSION, plan.to_dict(), cfg.chunk_size, cfg.max_class_locations])
