"""Batch prediction at scale: scans per minute vs Ray workers on the simulated three-node cluster.

    python benchmarks/predict_batch.py [--scans 200] [--workers 1 2 4] [--scale 2] [--results DIR]

`--scans` CT-like scans (the synthetic liver task, its 64x64x32 grid `--scale` times finer: 2
gives 128x128x64; 5 distinct volumes, symlinked under distinct case ids) are predicted by
`python -m pipeline.predict --num-workers N --tta off` on the cluster of `cluster/simulate.py`
(head 1 CPU, node-a 1, node-b 2: at most 4 workers of 1 CPU), with a tiny UniSeg (the `tiny`
preset, untrained weights: the work per scan is the same). Then the largest worker count is run
again with `--resume` on its finished folder: it must recompute nothing (every output's mtime
kept). Results: JSON under `benchmarks/results/predict_batch/` (benchmarks/results.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import results  # noqa: E402
from cluster.simulate import detached_cluster  # noqa: E402
from model.presets import PRESETS  # noqa: E402
from pipeline.common.logs import setup_logging  # noqa: E402
from pipeline.common.model_card import ModelCard, TaskCard, build_from_card, save_model_dir  # noqa: E402
from pipeline.datasets import DEFAULT_TASKS, write_task  # noqa: E402

log = logging.getLogger("benchmarks.predict_batch")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "predict_batch"
DISTINCT = 5


def write_scans(work: Path, scans: int, scale: float) -> tuple[Path, TaskCard]:
    """`scans` scan files (DISTINCT volumes, symlinked) and the task's card."""
    base = DEFAULT_TASKS[0]
    task = replace(base, num_cases=DISTINCT, num_test_cases=0, shape=tuple(round(n * scale) for n in base.shape),
                   spacing=tuple(s / scale for s in base.spacing))
    raw = write_task(work / "raw", task)
    inputs = work / "scans"
    inputs.mkdir()
    for i in range(scans):  # "scan-0001", not "scan_0001": that would read as channel 1 of "scan"
        source = raw / "imagesTr" / f"{task.case_prefix}_{i % DISTINCT:03d}.nii.gz"
        (inputs / f"scan-{i:04d}.nii.gz").symlink_to(source)
    x, y, z = task.spacing
    card = TaskCard(task.name, dict(enumerate(task.labels)), task.modalities, (z, y, x), ({"scheme": "zscore"},))
    return inputs, card


def predict(model: Path, task: str, inputs: Path, output: Path, workers: int, resume: bool = False) -> float:
    """Wall seconds of one `pipeline.predict` batch (the process from start to end)."""
    command = [sys.executable, "-m", "pipeline.predict", "--model", str(model), "--task", task, "-i", str(inputs),
               "-o", str(output), "--tta", "off", "--num-workers", str(workers), *(["--resume"] if resume else [])]
    log.info("%s", " ".join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scans", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--scale", type=float, default=2.0, help="grid refinement of the 64x64x32 liver task")
    parser.add_argument("--results", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    setup_logging()
    run = results.start()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        work = Path(tmp)
        inputs, task = write_scans(work, args.scans, args.scale)
        card = ModelCard(PRESETS["tiny"], (task,))
        model = save_model_dir(build_from_card(card), card, work / "model")
        with detached_cluster() as cpus:
            for workers in sorted(args.workers):
                if workers > cpus:
                    raise SystemExit(f"--workers {workers}: the simulated cluster has {cpus} CPUs")
                seconds = predict(model, task.name, inputs, work / f"out-{workers}", workers)
                rows.append({"workers": workers, "seconds": seconds, "scans_per_minute": args.scans / seconds * 60})
                log.info("%s", rows[-1])
            last = work / f"out-{max(args.workers)}"
            before = _mtimes(last)
            rerun = predict(model, task.name, inputs, last, max(args.workers), resume=True)
            recomputed = sorted(name for name, mtime in _mtimes(last).items() if before.get(name) != mtime)
    record = {"scans": args.scans, "scan_shape": [round(n * args.scale) for n in DEFAULT_TASKS[0].shape],
               "rows": rows,
               "resume": {"workers": max(args.workers), "seconds": rerun, "recomputed_outputs": recomputed}}
    results.write(args.results / "results.json", run, record)
    print(json.dumps({"rows": rows, "resume": record["resume"]}, indent=2))


if __name__ == "__main__":
    main()
