"""Cross-validation folds of a store's labelled cases, stable per case, and test-case labels.

Rule (nnU-Net's splits_final.json, made stable under changes of the case set):
- a store's labelled cases fall into `num_folds` folds (ingest.folds, default 5); with fewer
  labelled cases than that, as many folds as cases; with fewer than two cases, no folds (the
  case trains, nothing is held out);
- the assignment is recorded in the store (root attribute `folds`, kept apart from the
  manifest, so an interrupted or failed ingest keeps it) and never changes for a case it holds:
  a case that fails, leaves the source or comes back keeps its fold, and so does every other
  case;
- a new case goes to the fold with the fewest present cases (lowest index on ties); new cases
  are placed in the order of a seeded hash of their ids, so the draw is independent of listing
  order. A first ingest is therefore a balanced, seeded shuffle;
- the default train/validation split is fold 0 held out.
Another `ingest.folds` or `ingest.split_seed` than recorded draws new folds (logged); so does
`--overwrite`, which deletes the record with the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.ingest.dataset import CaseSource, DatasetSpec

log = logging.getLogger(__name__)

FOLDS_ATTR = "folds"


@dataclasses.dataclass(frozen=True)
class FoldAssignment:
    """The store's fold assignment: every case ever placed (present or not) -> its fold."""

    num_folds: int
    seed: int
    assignment: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> FoldAssignment | None:
        if not raw:
            return None
        return cls(int(raw["num_folds"]), int(raw["seed"]), {str(k): int(v) for k, v in raw["assignment"].items()})


def assign_folds(case_ids: Iterable[str], num_folds: int, seed: int, recorded: FoldAssignment | None) -> FoldAssignment:
    """The record after placing `case_ids` (the store's labelled cases); see the module docstring."""
    ids = sorted(set(case_ids))
    if recorded is not None and (recorded.num_folds, recorded.seed) != (num_folds, seed):
        log.warning("folds were drawn with %d folds and seed %d; drawing new ones with %d folds and seed %d",
                    recorded.num_folds, recorded.seed, num_folds, seed)
        recorded = None
    assignment = dict(recorded.assignment) if recorded else {}
    present = {c: assignment[c] for c in ids if c in assignment}
    count = fold_count(len(ids), num_folds, present.values())
    if count == 0:
        return FoldAssignment(num_folds, seed, assignment)
    sizes = [0] * count
    for fold in present.values():
        sizes[fold] += 1
    for case_id in sorted((c for c in ids if c not in present), key=lambda c: _hash(seed, c)):
        fold = sizes.index(min(sizes))
        assignment[case_id] = fold
        sizes[fold] += 1
    return FoldAssignment(num_folds, seed, assignment)


def fold_count(num_cases: int, num_folds: int, recorded_folds: Iterable[int] = ()) -> int:
    """Folds of a store: `num_folds`, fewer when there are fewer cases (none below two cases),
    more when recorded cases sit in higher folds (a set that shrank keeps its cases' folds)."""
    count = min(num_folds, num_cases) if num_cases >= 2 else 0
    return max([count, *(f + 1 for f in recorded_folds)])


def fold_lists(record: FoldAssignment, case_ids: Iterable[str]) -> list[list[str]]:
    """The held-out cases of each fold, among `case_ids` (the store's labelled cases)."""
    ids = sorted(set(case_ids))
    if not all(c in record.assignment for c in ids):  # fewer than two cases: never placed
        return []
    count = fold_count(len(ids), record.num_folds, (record.assignment[c] for c in ids))
    folds: list[list[str]] = [[] for _ in range(count)]
    for case_id in ids:
        folds[record.assignment[case_id]].append(case_id)
    empty = [str(i) for i, fold in enumerate(folds) if not fold]
    if empty:
        log.warning("fold(s) %s hold no case (cases left the store); they validate on nothing", ", ".join(empty))
    return folds


def store_folds(root: Any, dataset: str, labelled: Iterable[str], num_folds: int, seed: int) -> list[list[str]]:
    """Place the labelled cases of the store at `root` (a Zarr group): the recorded assignment
    is updated in the store; returns the held-out cases of each fold."""
    ids = sorted(labelled)
    record = assign_folds(ids, num_folds, seed, FoldAssignment.from_dict(root.attrs.get(FOLDS_ATTR)))
    if root.attrs.get(FOLDS_ATTR) != record.to_dict():
        root.attrs[FOLDS_ATTR] = record.to_dict()
    folds = fold_lists(record, ids)
    describe(dataset, folds, num_folds)
    return folds


def describe(dataset: str, folds: list[list[str]], num_folds: int) -> None:
    """One log line on the folds (and why there are fewer than asked)."""
    cases = sum(len(f) for f in folds)
    if cases < 2:
        log.warning("%s: %d labelled case(s): no cross-validation folds, nothing held out for validation",
                    dataset, cases)
    elif len(folds) < num_folds:
        log.warning("%s: %d labelled cases, fewer than %d: %d folds of one case", dataset, cases, num_folds, len(folds))
    else:
        log.info("%s: %d folds of %s cases", dataset, len(folds), "/".join(str(len(f)) for f in folds))


def with_test_labels(spec: DatasetSpec) -> DatasetSpec:
    """The spec with each test case's `labelsTs/<case><ending>` as its label, where that file exists
    (nnU-Net's layout), so that test cases can be scored."""
    cases = tuple(_test_label(spec, c) if c.is_test and c.label is None else c for c in spec.cases)
    return dataclasses.replace(spec, cases=cases)


def _test_label(spec: DatasetSpec, case: CaseSource) -> CaseSource:
    label = spec.root / "labelsTs" / f"{case.case_id}{spec.file_ending}"
    return dataclasses.replace(case, label=label) if label.is_file() else case


def _hash(seed: int, case_id: str) -> str:
    return hashlib.sha256(f"{seed}:{case_id}".encode()).hexdigest()
