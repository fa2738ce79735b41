"""What a re-run of ingest keeps: the change detection that skips current cases and reuses the
plan, and the stored copies of cases that fail now.

Resume rule: a case is skipped when its group is complete and was written from the same source
content (a hash of its files; with `change_detection: stat`, unchanged names, sizes and mtimes
are trusted without hashing) with the same recipe (plan + write options); the plan itself is
reused while the training cases' fingerprints and the planning options are unchanged. A re-run
with nothing changed writes nothing.

Nothing good is lost: a case that fails at a re-run (a file missing, unreadable, a full disk)
keeps its stored copy from the earlier ingest, marked stale in the manifest; cases that failed
without a stored copy are listed as failed there. One store, one recipe: a re-run whose plan or
write options differ from those of a stale copy it would keep is refused before any case is
written (the copy cannot be re-normalised: its source is what fails); a case that fails in the
case pass under a new recipe loses its old copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from pipeline.common.config import IngestConfig
from pipeline.common.store import FORMAT_VERSION
from pipeline.ingest import writer
from pipeline.ingest.dataset import DatasetError, DatasetSpec, content_fingerprint, stat_signature
from pipeline.ingest.executor import Compute, task
from pipeline.ingest.plan import Plan
from pipeline.ingest.report import DatasetReport

log = logging.getLogger(__name__)


def source_fingerprints(
    spec: DatasetSpec, stored: dict[str, dict[str, Any] | None], cfg: IngestConfig, compute: Compute
) -> tuple[dict[str, str], dict[str, str]]:
    """Per case, the content hash of its files (one task per case) and the stat signature. The
    stored hash stands in for a stored case whose files are missing (kept, see `settle_failures`)
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
    hashes = compute([task(content_fingerprint, c, key=f"hash-{spec.name}-{c.case_id}") for c in hashed])
    return known | {c.case_id: h for c, h in zip(hashed, hashes)}, stats


def refuse_two_recipes(
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


def settle_failures(
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


def is_current(attrs: dict[str, Any] | None, fingerprint: str, recipe: str) -> bool:
    """Whether a stored case (its attrs; None: not stored complete) is of this content and recipe."""
    return attrs is not None and attrs.get("source_fingerprint") == fingerprint and attrs.get("recipe") == recipe


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def plan_inputs(spec: DatasetSpec, cfg: IngestConfig, fingerprints: dict[str, str]) -> str:
    """A digest of what the plan depends on (the cached plan is reused while it is unchanged)."""
    return _digest({
        "format_version": FORMAT_VERSION,
        "modalities": spec.modalities,
        "labels": spec.labels,
        "cases": {c.case_id: fingerprints[c.case_id] for c in spec.train_cases},
        "options": [cfg.target_spacing, cfg.ct_normalization, cfg.image_order, cfg.label_resampling],
    })


def recipe_digest(plan: Plan, cfg: IngestConfig) -> str:
    """A digest of how cases are preprocessed and written (plan + write options)."""
    return _digest([FORMAT_VERSION, plan.to_dict(), cfg.chunk_size, cfg.max_class_locations])
