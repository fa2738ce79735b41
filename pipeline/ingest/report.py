"""What an ingest did: one report per source dataset, and the batch's exit status."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline.common.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from pipeline.ingest.case import CaseOutcome

log = logging.getLogger(__name__)


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


def collect(outcomes: list[CaseOutcome], report: DatasetReport, ingested: bool = True) -> None:
    """Log each outcome's problems and record its case as failed, or (with `ingested`) as ingested
    with its warnings."""
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
