"""Ingest orchestration: for each dataset, list cases, plan (cached), ingest what changed, write
the manifest last; report every problem and never stop at a bad case.

Resume rule: a case is skipped when its group is complete and was written from the same source
content (a hash of its files; with `change_detection: stat`, unchanged names, sizes and mtimes
are trusted without hashing) with the same recipe (plan + write options); the plan itself is
reused while the training cases' fingerprints and the planning options are unchanged. A re-run
with nothing changed writes nothing.

Nothing good is lost: a case that fails at a re-run (a file missing, unreadable, a full disk)
keeps its stored copy from the earlier ingest, marked stale in the manifest; cases that failed
without a stored copy are listed as failed there. Only cases no longer listed by the source are
removed. One store, one recipe: a re-run whose plan or write options differ from those of a stale
copy it would keep is refused before any case is written (the copy cannot be re-normalised: its
source is what fails); a case that fails in the case pass under a new recipe loses its old copy.
A re-run that fails for the whole dataset (dataset.json invalid, the folder gone, no plan)
leaves a finished store's cases as they were and records the failure in its manifest
(`last_ingest_failed`: when, why), so that readers warn; the next successful ingest clears it.
One bad source never stops the others. Exit status (`IngestReport.exit_status`): 0 all done, 2
bad input (a dataset, case or option; one line per problem), 1 something else failed (a full
disk, a bug: logged, with a traceback for a bug).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dask
from dask.delayed import Delayed

from pipeline.common.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, output_folder_problem
from pipeline.common.config import IngestConfig
from pipeline.common.store import FORMAT_VERSION, StoreError, StoreManifest
from pipeline.ingest import writer
from pipeline.ingest.case import CaseOutcome, WriteTarget, guarded, ingest_step, plan_step
from pipeline.ingest.dataset import (
    CaseSource, DatasetError, DatasetSpec, content_fingerprint, read_dataset, stat_signature,
)
from pipeline.ingest.executor import Compute, executor
from pipeline.ingest.manifest import build_manifest
from pipeline.ingest.split import store_folds, with_test_labels
from pipeline.ingest.plan import Plan, make_plan, needs_statistics

log = logging.getLogger(__name__)


class OutputError(ValueError):
    """The output root cannot be written, or two sources would write one store; found before any work."""


@dataclass
class DatasetReport:
    source: str
    store: str = ""
    ingested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, tuple[str, ...]] = field(default_factory=dict)  # every case that failed this run
    stale: list[str] = field(default_factory=list)  # failed cases whose stored copy was kept
    warnings: list[str] = field(default_factory=list)
    error: str | None = None  # the whole dataset failed
    crashed: bool = False  # a failure that is not the input's (a full disk, a bug)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed

    def summary(self) -> str:
        if self.error is not None:
            return f"{self.source}: FAILED: {self.error}"
        kept = f"; kept the stored copy of {', '.join(self.stale)} (stale)" if self.stale else ""
        return (f"{self.source} -> {self.store}: {len(self.ingested)} ingested, {len(self.skipped)} unchanged, "
                f"{len(self.failed)} failed, {len(self.warnings)} warnings{kept}")


@dataclass
class IngestReport:
    datasets: list[DatasetReport]

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.datasets)

    @property
    def exit_status(self) -> int:
        """0 all done; 1 something failed that is not the input's fault; else 2 for bad input."""
        if any(d.crashed for d in self.datasets):
            return EXIT_FAILED
        return EXIT_OK if self.ok else EXIT_BAD_INPUT


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
    fingerprints, stats = _fingerprints(spec, stored, cfg, compute)
    _collect([CaseOutcome(c.case_id, problems=c.problems) for c in spec.cases if c.problems], report, False)
    previous = writer.read_manifest(root)
    plan = _plan(spec, root, cfg, fingerprints, compute, report)
    if plan is None:
        return
    target = WriteTarget(report.store, storage_options, cfg.chunk_size, cfg.max_class_locations, _recipe(plan, cfg))
    _refuse_two_recipes(report, stored, target.recipe, previous, plan)
    candidates = [c for c in spec.cases if c.case_id not in report.failed]
    todo = [c for c in candidates if not _is_current(stored[c.case_id], fingerprints[c.case_id], target.recipe)]
    report.skipped = sorted({c.case_id for c in candidates} - {c.case_id for c in todo})
    if todo:
        writer.clear_manifest(root)
        _ingest_cases(spec, plan, target, todo, fingerprints, stats, compute, report)
    failed, stale = _settle_failures(root, report, target.recipe)
    fingerprints |= stale
    done = [c for c in spec.cases if c.case_id not in failed]
    folds = store_folds(root, spec.name, [c.case_id for c in done if not c.is_test], cfg.folds, cfg.split_seed)
    manifest = build_manifest(spec, plan, done, fingerprints, folds)
    stale_reasons = {c: "; ".join(report.failed[c]) for c in stale}
    _commit(root, dataclasses.replace(manifest, failed=failed, stale=stale_reasons), report.store)


def _fingerprints(
    spec: DatasetSpec, stored: dict[str, dict[str, Any] | None], cfg: IngestConfig, compute: Compute
) -> tuple[dict[str, str], dict[str, str]]:
    """Per case, the content hash of its files (one task per case) and the stat signature. The
    stored hash stands in for a stored case whose files are missing (kept, see `_settle_failures`)
    and, with `change_detection: stat`, for one whose names, sizes and mtimes are unchanged."""
    stats = {c.case_id: stat_signature(c) for c in spec.cases}
    known = {}
    for case in spec.cases:
        attrs = stored[case.case_id]
        if attrs is None:
            continue
        if case.problems or (cfg.change_detection == "stat" and attrs.get("source_stat") == stats[case.case_id]):
            known[case.case_id] = attrs["source_fingerprint"]
    hashed = [c for c in spec.cases if c.case_id not in known]
    if hashed:
        log.info("%s: hashing the files of %d case(s) to detect changes", spec.name, len(hashed))
    hashes = compute([_task(content_fingerprint, c, key=f"hash-{spec.name}-{c.case_id}") for c in hashed])
    return known | {c.case_id: h for c, h in zip(hashed, hashes)}, stats


def _refuse_two_recipes(
    report: DatasetReport, stored: dict[str, dict[str, Any] | None], recipe: str,
    previous: dict[str, Any] | None, plan: Plan,
) -> None:
    """Before any case is written: a case that already failed keeps its stored copy (stale), which
    was preprocessed under the earlier recipe; if the recipe changed (intensity statistics, target
    spacing, write options), keeping it would leave one store with two normalisations. DatasetError."""
    kept = sorted(c for c in report.failed if stored.get(c) and stored[c].get("recipe") != recipe)
    if kept:
        raise DatasetError(
            f"{report.store}: {_what_changed(previous, plan)}, but {', '.join(kept)} would keep "
            "its stored copy preprocessed the earlier way (its source fails, logged above); the store "
            "is left as it was: fix or drop the failing case(s), or re-ingest with --overwrite")


def _what_changed(previous: dict[str, Any] | None, plan: Plan) -> str:
    """One phrase naming what differs between the stored manifest's plan and `plan`."""
    if previous is None:
        return "the preprocessing recipe would change"
    new = plan.to_dict()
    changes = [f"target spacing {previous['target_spacing']} -> {new['target_spacing']}"] \
        if list(previous["target_spacing"]) != new["target_spacing"] else []
    for channel, (old, norm) in enumerate(zip(previous["normalization"], new["normalization"])):
        keys = [k for k in norm if old.get(k) != norm[k]]
        changes += [f"channel {channel} {k} {_short(old.get(k))} -> {_short(norm[k])}" for k in keys]
    if not changes:
        return "the write options (chunk_size, max_class_locations) would change"
    return "the plan would change (" + ", ".join(changes) + ")"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _settle_failures(
    root: Any, report: DatasetReport, recipe: str
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Split this run's failed cases: those whose stored copy is still complete and preprocessed
    with this run's recipe stay in the store, marked stale (returned with their stored
    fingerprints); the others are failed (with problems). A stored copy of another recipe (the
    case failed in the case pass after the plan changed) is not kept: one store, one recipe."""
    failed, stale = {}, {}
    for case_id, problems in sorted(report.failed.items()):
        attrs = writer.completed_case_attrs(root, case_id)
        if attrs is None or attrs.get("recipe") != recipe:
            failed[case_id] = list(problems) if attrs is None else [*problems, _drop_line(report.store, case_id)]
            continue
        stale[case_id] = attrs["source_fingerprint"]
        report.stale.append(case_id)
        log.warning("%s: kept the stored case %s from an earlier ingest, marked stale (its source failed)",
                    report.store, case_id)
    return failed, stale


def _drop_line(store: str, case_id: str) -> str:
    line = f"{store}: removed the stored copy of {case_id}: it was preprocessed under the earlier plan"
    log.error("%s", line)
    return line


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
    spec_node, plan_node, target_node = _shared((spec, plan, target), key=f"inputs-{spec.name}")
    tasks = [_task(guarded, ingest_step, c, spec_node, plan_node, target_node, fingerprints[c.case_id],
                   stats[c.case_id], key=f"ingest-{spec.name}-{c.case_id}") for c in cases]
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
                for c in spec.train_cases if not c.problems]  # cases with missing files are reported already
    reduced = _task(_reduce_plan, outcomes, spec, cfg, key=f"plan-{spec.name}")
    [(plan, results)] = compute([reduced])
    _collect(results, report, ingested=False)
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


def _collect(outcomes: list[CaseOutcome], report: DatasetReport, ingested: bool = True) -> None:
    for outcome in outcomes:
        for problem in outcome.problems:
            log.error("%s", problem)
        report.crashed |= outcome.crashed
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


def _is_current(attrs: dict[str, Any] | None, fingerprint: str, recipe: str) -> bool:
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
