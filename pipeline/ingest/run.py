"""Ingest orchestration: for each dataset, list cases, plan (cached), ingest what changed, write
the manifest last; report every problem (`pipeline.ingest.report`) and never stop at a bad case.

What a re-run skips and keeps (current cases, the cached plan, the stored copies of cases that
fail now) is `pipeline.ingest.resume`'s rule. Only cases no longer listed by the source are
removed. A re-run that fails for the whole dataset (dataset.json invalid, the folder gone, no plan)
leaves a finished store's cases as they were and records the failure in its manifest
(`last_ingest_failed`: when, why), so that readers warn; the next successful ingest clears it.
One bad source never stops the others. Exit status (`IngestReport.exit_status`): 0 all done, 2
bad input (a dataset, case or option; one line per problem), 1 something else failed (a full
disk, a bug: logged, with a traceback for a bug).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.common.cli import output_folder_problem
from pipeline.common.config import IngestConfig
from pipeline.common.store import StoreError, StoreManifest
from pipeline.ingest import writer
from pipeline.ingest.case import CaseOutcome, WriteTarget, guarded, ingest_step, plan_step
from pipeline.ingest.dataset import CaseSource, DatasetError, DatasetSpec, read_dataset
from pipeline.ingest.executor import Compute, executor, shared, task
from pipeline.ingest.manifest import build_manifest
from pipeline.ingest.plan import Plan, make_plan, needs_statistics
from pipeline.ingest.report import DatasetReport, IngestReport, collect
from pipeline.ingest.resume import (
    is_current, plan_inputs, recipe_digest, refuse_two_recipes, settle_failures, source_fingerprints,
)
from pipeline.ingest.split import store_folds, with_test_labels

log = logging.getLogger(__name__)


class OutputError(ValueError):
    """The output root cannot be written, or two sources would write one store; found before any work."""


def store_uri(out: str, dataset_name: str) -> str:
    """`<out>/<dataset>.zarr` for a local folder or an fsspec URL."""
    if "://" in out:
        return f"{out.rstrip('/')}/{dataset_name}.zarr"
    return str(Path(out) / f"{dataset_name}.zarr")


def run(
    sources: Sequence[str | Path], out: str, cfg: IngestConfig, storage_options: dict[str, Any] | None = None
) -> IngestReport:
    """Ingest each source dataset into `<out>/<folder name>.zarr`; see the module docstring.
    Raises OutputError, before any work, when `out` cannot be written or two sources share a name."""
    _check_distinct(sources, out)
    check_output(out, storage_options)
    with executor(cfg) as compute:
        reports = [ingest_dataset(Path(s), out, cfg, storage_options, compute) for s in sources]
    for report in reports:
        (log.info if report.ok else log.error)(report.summary())
    return IngestReport(reports)


def _check_distinct(sources: Sequence[str | Path], out: str) -> None:
    """Two source folders of one name would write (and overwrite) one store."""
    first: dict[str, Path] = {}
    for source in map(Path, sources):
        other = first.setdefault(source.resolve().name, source)
        if other is not source:
            raise OutputError(f"{other} and {source} would both write {store_uri(out, source.resolve().name)}; "
                              "give each dataset folder its own name")


def check_output(out: str, storage_options: dict[str, Any] | None) -> None:
    """Create `out` if needed and write (then delete) a probe object in it; OutputError if that fails."""
    problem = output_folder_problem(out, storage_options)
    if problem:
        raise OutputError(problem)


def ingest_dataset(
    source: Path, out: str, cfg: IngestConfig, storage_options: dict[str, Any] | None, compute: Compute
) -> DatasetReport:
    """Ingest one source; whatever goes wrong ends up in its report, never stops the batch."""
    report = DatasetReport(str(source))
    try:
        _ingest_dataset(source, out, cfg, storage_options, compute, report)
    except (DatasetError, StoreError) as err:
        log.error("%s", err)
        report.error = str(err)
    except OSError as err:  # a full disk, a lost connection: one line naming the store (or the file)
        name = str(err.filename or "")
        where = report.store if report.store and (not name or name.startswith(report.store)) else name or source
        report.error = f"{where}: cannot write: {err.strerror or err}"
        report.crashed = True
    except Exception as err:  # the batch goes on; the traceback is logged
        log.exception("%s: ingest failed", report.store or source)
        report.error = f"{report.store or source}: {type(err).__name__}: {' '.join(str(err).split())}"
        report.crashed = True
    if report.error is not None:
        _mark_store(report.store or store_uri(out, source.resolve().name), storage_options, report.error)
    return report


def _mark_store(uri: str, storage_options: dict[str, Any] | None, error: str) -> None:
    """A dataset that failed as a whole: its store from an earlier ingest, if any, keeps its
    cases and says in its manifest that its last ingest failed (readers warn, training refuses)."""
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        marked = writer.mark_last_ingest_failed(uri, storage_options, at, "; ".join(error.splitlines()))
    except OSError as err:  # a full disk: the store is unfinished or says so already
        log.warning("%s: could not record the failed ingest in the manifest (%s)", uri, err.strerror or err)
        return
    if marked:
        log.warning("%s: kept the store of an earlier ingest; its manifest records that this ingest failed", uri)


def _ingest_dataset(
    source: Path,
    out: str,
    cfg: IngestConfig,
    storage_options: dict[str, Any] | None,
    compute: Compute,
    report: DatasetReport,
) -> None:
    spec = with_test_labels(read_dataset(source))
    report.store = store_uri(out, spec.name)
    root = writer.open_store(report.store, storage_options, cfg.overwrite)
    stored = {c.case_id: writer.completed_case_attrs(root, c.case_id) for c in spec.cases}
    fingerprints, stats = source_fingerprints(spec, stored, cfg, compute)
    collect([CaseOutcome(c.case_id, problems=c.problems) for c in spec.cases if c.problems], report, False)
    previous = writer.read_manifest(root)
    plan = _plan(spec, root, cfg, fingerprints, compute, report)
    if plan is None:
        return
    target = WriteTarget(report.store, storage_options, cfg.chunk_size, cfg.max_class_locations, recipe_digest(plan, cfg))
    refuse_two_recipes(report, stored, target.recipe, previous, plan)
    candidates = [c for c in spec.cases if c.case_id not in report.failed]
    todo = [c for c in candidates if not is_current(stored[c.case_id], fingerprints[c.case_id], target.recipe)]
    report.skipped = sorted({c.case_id for c in candidates} - {c.case_id for c in todo})
    if todo:
        writer.clear_manifest(root)
        _ingest_cases(spec, plan, target, todo, fingerprints, stats, compute, report)
    failed, stale = settle_failures(root, report, target.recipe)
    fingerprints |= stale
    done = [c for c in spec.cases if c.case_id not in failed]
    folds = store_folds(root, spec.name, [c.case_id for c in done if not c.is_test], cfg.folds, cfg.split_seed)
    manifest = build_manifest(spec, plan, done, fingerprints, folds)
    stale_reasons = {c: "; ".join(report.failed[c]) for c in stale}
    _commit(root, dataclasses.replace(manifest, failed=failed, stale=stale_reasons), report.store)


def _ingest_cases(
    spec: DatasetSpec,
    plan: Plan,
    target: WriteTarget,
    cases: list[CaseSource],
    fingerprints: dict[str, str],
    stats: dict[str, str],
    compute: Compute,
    report: DatasetReport,
) -> None:
    """The case pass: one task per case; the shared inputs are one graph node, not one copy per task."""
    spec_node, plan_node, target_node = shared((spec, plan, target), key=f"inputs-{spec.name}")
    tasks = [task(guarded, ingest_step, c, spec_node, plan_node, target_node, fingerprints[c.case_id],
                   stats[c.case_id], key=f"ingest-{spec.name}-{c.case_id}") for c in cases]
    collect(compute(tasks), report)


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
    inputs = plan_inputs(spec, cfg, fingerprints)
    cached = writer.read_plan(root)
    if cached is not None and cached.get("inputs") == inputs:
        return Plan.from_dict(cached["plan"])
    statistics = needs_statistics(spec, cfg)
    [shared_spec] = shared((spec,), key=f"spec-{spec.name}")
    outcomes = [task(guarded, plan_step, c, shared_spec, statistics, key=f"plan-{spec.name}-{c.case_id}")
                for c in spec.train_cases if not c.problems]  # cases with missing files are reported already
    reduced = task(_reduce_plan, outcomes, spec, cfg, key=f"plan-{spec.name}")
    [(plan, results)] = compute([reduced])
    collect(results, report, ingested=False)
    if isinstance(plan, str):
        log.error("%s", plan)
        report.error = plan
        return None
    writer.write_plan(root, {"inputs": inputs, "plan": plan.to_dict()})
    log.info("%s: target spacing (z, y, x) %s, normalisation %s", spec.name,
             tuple(round(s, 4) for s in plan.target_spacing), [n.scheme for n in plan.normalization])
    return plan


def _reduce_plan(
    outcomes: list[CaseOutcome], spec: DatasetSpec, cfg: IngestConfig
) -> tuple[Plan | str, list[CaseOutcome]]:
    """The plan, or why there is none (a message, so that no executor has to carry an error), and
    the outcomes without their summaries: the driver needs their problems only, so its memory
    does not grow with the case count (the summaries' foreground samples stay on the worker)."""
    light = [dataclasses.replace(o, summary=None) for o in outcomes]
    try:
        return make_plan([o.summary for o in outcomes if o.ok], spec, cfg), light
    except ValueError as err:
        return str(err), light
