"""Ingest throughput and patch reads: our Dask ingest next to nnU-Net v2's plan_and_preprocess.

Run by hand. nnU-Net lives in its own venv (a different torch); set it up once:

    python3 -m venv .venv-peers && echo '*' > .venv-peers/.gitignore \\
        && .venv-peers/bin/pip install torch==2.14.1 torchvision==0.29.1 nnunetv2

then `python -m benchmarks.ingest [--cases 24] [--scale 2] [--workers 1 2] [--patches 300]
[--chunk-size 32 32 32]`. `--without-nnunet` skips nnU-Net (no peers venv needed): our ingest
and the two readers of our store only. Every figure goes to `--out` (a results file,
`benchmarks/results.py`).

One synthetic task (`--task`, default Task01_SynthLiver: CT, anisotropic, mixed orientations)
is written in nnU-Net v2 layout as Dataset501_<name> with `--cases` cases, its voxel grid
`--scale` times finer on every axis (same anatomy). Both tools read the same files:

- ours: `python -m pipeline.ingest --num-workers N` (fingerprint, plan, checks, reorientation,
  resampling, normalisation, Zarr writes);
- nnU-Net: `nnUNetv2_plan_and_preprocess -c 3d_fullres -npfp N -np N` (fingerprint, plans,
  preprocessing to .b2nd), without --verify_dataset_integrity.

Figures: wall time, cases/s, MiB/s of raw voxel bytes in (images + labels, uncompressed), peak
memory of the whole process tree (PSS, sampled every 50 ms: pages shared between processes,
such as torch's, are split among them, not counted once per process), CPU seconds of the tree,
output size. With `--repeats R`, each row is the fastest of R runs. Patch reads/s: random
windows of `--patch` voxels from random training cases, image and label, one fresh process per
run (the first read of a case opens it): ours through `TaskStore.sample_patch` with its
hand-written shard reader; the same windows of the same store through zarr-python's own read
(`TaskStore` with every array on its zarr-python path: `array[window]`, which checks the same
CRC32C per chunk); nnU-Net as its data loader does (`load_case`, then a slice of the blosc2
arrays). The readers alternate, R runs each, and the table shows the median reads/s and CPU
milliseconds per read. The hand reader is kept only while it is at least 1.5x faster per patch
than zarr-python's read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil

from benchmarks import results
from pipeline.common.logs import setup_logging
from pipeline.datasets import DEFAULT_TASKS, write_task

log = logging.getLogger("benchmarks.ingest")

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID = 501

# Both print [reads/s, CPU ms per read] after 5 untimed reads.
_TIMED = """
for _ in range(5):
    read()
wall, cpu = time.perf_counter(), time.process_time()
for _ in range(count):
    read()
print(json.dumps([count / (time.perf_counter() - wall), (time.process_time() - cpu) / count * 1e3]))
"""
# Runs in the peers venv: nnU-Net's own dataset class, loaded per sample as its data loader does.
_NNUNET_READS = """
import json, sys, time
import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
folder, count, patch = sys.argv[1], int(sys.argv[2]), [int(v) for v in sys.argv[3:6]]
dataset = infer_dataset_class(folder)(folder)
keys, rng = list(dataset.identifiers), np.random.default_rng(0)
def read():
    data, seg, _, _ = dataset.load_case(keys[rng.integers(len(keys))])
    start = [int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(data.shape[1:], patch)]
    window = (slice(None), *(slice(a, a + p) for a, p in zip(start, patch)))
    np.asarray(data[window]), np.asarray(seg[window])
""" + _TIMED
_OUR_READS = """
import json, sys, time
import numpy as np
from pipeline.common.store import TaskStore
store, count, patch = sys.argv[1], int(sys.argv[2]), tuple(int(v) for v in sys.argv[3:6])
reader, rng = TaskStore.open(store), np.random.default_rng(0)
def read():
    reader.sample_patch(rng, patch, force_foreground=False)
""" + _TIMED
# The same reads, every array read by zarr-python (`array[window]`) instead of the shard reader.
_ZARR_READS = _OUR_READS.replace(
    "from pipeline.common.store import TaskStore",
    "from pipeline.common import store_read as s\ns.ShardReader.supports = staticmethod(lambda array: False)\n"
    "from pipeline.common.store import TaskStore")
HAND, ZARR, NNUNET = "ours", "ours, zarr-python read", "nnU-Net v2"


@dataclass(frozen=True)
class Run:
    tool: str
    workers: int
    seconds: float
    peak_mib: float
    cpu_seconds: float
    out_mib: float


def _tree_pss(process: psutil.Process) -> int:
    """Proportional set size of a process and its descendants: shared pages are split, not repeated."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(tool: str, workers: int, command: list[str], env: dict[str, str], output: Path) -> Run:
    """Run a command to its end; wall time, peak tree PSS, CPU time and size of `output`."""
    log.info("%s, %d worker(s): %s", tool, workers, " ".join(command))
    cpu, start, peak = _children_cpu(), time.perf_counter(), 0
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        process = psutil.Process(child.pid)
        while child.poll() is None:
            peak = max(peak, _tree_pss(process))
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        if child.returncode != 0:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{tool} exited with {child.returncode}:\n{tail}")
    out_bytes = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    return Run(tool, workers, seconds, peak / 2**20, _children_cpu() - cpu, out_bytes / 2**20)


def write_dataset(raw: Path, task_name: str, cases: int, scale: float) -> Path:
    """The benchmark dataset in nnU-Net v2 layout: a default task with more cases, finer grid."""
    base = next(t for t in DEFAULT_TASKS if t.name == task_name)
    name = f"Dataset{DATASET_ID}_{base.name.split('_', 1)[1]}"
    task = replace(base, name=name, num_cases=cases, num_test_cases=0,
                   shape=tuple(round(n * scale) for n in base.shape),
                   spacing=tuple(s / scale for s in base.spacing))
    log.info("writing %d cases of %s voxels", cases, task.shape)
    return write_task(raw, task, layout="nnunetv2")


def raw_mib(dataset: Path) -> float:
    """Uncompressed voxel bytes of the training images and labels, from the NIfTI headers."""
    files = [*(dataset / "imagesTr").glob("*.nii.gz"), *(dataset / "labelsTr").glob("*.nii.gz")]
    headers = [nib.load(f).header for f in files]
    return sum(int(np.prod(h.get_data_shape())) * h.get_data_dtype().itemsize for h in headers) / 2**20


def run_ours(dataset: Path, work: Path, workers: int, chunk_size: list[int] | None = None) -> Run:
    out = work / f"ours-{workers}"
    shutil.rmtree(out, ignore_errors=True)  # a rerun would skip every unchanged case
    command = [sys.executable, "-m", "pipeline.ingest", "--source", str(dataset), "--out", str(out),
               "--num-workers", str(workers), *(["--chunk-size", *map(str, chunk_size)] if chunk_size else [])]
    return measure("ours", workers, command, dict(os.environ), out)


def run_nnunet(peers: Path, dataset: Path, work: Path, workers: int) -> Run:
    preprocessed = work / f"nnunet-{workers}"
    shutil.rmtree(preprocessed, ignore_errors=True)
    env = dict(os.environ, nnUNet_raw=str(dataset.parent), nnUNet_preprocessed=str(preprocessed),
               nnUNet_results=str(work / "nnunet-results"))
    command = [str(peers / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID),
               "-c", "3d_fullres", "-npfp", str(workers), "-np", str(workers)]
    return measure("nnU-Net v2", workers, command, env, preprocessed)


@dataclass(frozen=True)
class Reads:
    per_second: float  # median over runs
    cpu_ms: float  # median CPU time per read
    runs: tuple[float, ...]  # reads/s of each run


def _read_run(python: Path | str, code: str, data: Path, patch: tuple[int, int, int], count: int,
              env: dict[str, str] | None = None) -> list[float]:
    command = [str(python), "-c", code, str(data), str(count), *map(str, patch)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout)


def patch_reads(peers: Path | None, ours: Path, nnunet: Path, patch: tuple[int, int, int], count: int,
                repeats: int) -> dict[str, Reads]:
    """Reads/s and CPU per read of each reader (nnU-Net's unless `peers` is None), each run in a
    fresh process, alternating."""
    runs: dict[str, list[list[float]]] = {HAND: [], ZARR: [], **({NNUNET: []} if peers else {})}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _ in range(repeats):
        runs[HAND].append(_read_run(sys.executable, _OUR_READS, ours, patch, count, env))
        runs[ZARR].append(_read_run(sys.executable, _ZARR_READS, ours, patch, count, env))
        if peers:
            runs[NNUNET].append(_read_run(peers / "bin" / "python", _NNUNET_READS, nnunet, patch, count))
    return {tool: Reads(float(np.median([r for r, _ in v])), float(np.median([c for _, c in v])),
                        tuple(r for r, _ in v)) for tool, v in runs.items()}


def print_table(dataset: Path, cases: int, raw: float, runs: list[Run], reads: dict[str, Reads]) -> None:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\n{dataset.name}: {cases} cases, {raw:.0f} MiB raw voxels in; "
          f"{os.cpu_count()} CPUs, load average {load}\n")
    columns = ("workers", "wall s", "cases/s", "MiB/s", "peak MiB", "CPU s", "out MiB")
    print(f"{'tool':<11}" + "".join(f"{c:>9}" for c in columns))
    for r in runs:
        print(f"{r.tool:<11}{r.workers:>9}{r.seconds:>9.1f}{cases / r.seconds:>9.2f}{raw / r.seconds:>9.1f}"
              f"{r.peak_mib:>9.0f}{r.cpu_seconds:>9.1f}{r.out_mib:>9.1f}")
    if NNUNET in reads:
        print("\nratio ours / nnU-Net (throughput: > 1 is faster; memory: < 1 is leaner)")
        for workers in sorted({r.workers for r in runs}):
            ours, peer = (next(r for r in runs if r.tool == t and r.workers == workers) for t in (HAND, NNUNET))
            print(f"{workers} worker(s): cases/s x{peer.seconds / ours.seconds:.2f}, peak memory "
                  f"x{ours.peak_mib / peer.peak_mib:.2f}, CPU time x{ours.cpu_seconds / peer.cpu_seconds:.2f}")
    print(f"\npatch reads/s (median of {len(reads[HAND].runs)} runs; CPU ms per read):")
    for tool, r in reads.items():
        runs_text = ", ".join(f"{v:.0f}" for v in r.runs)
        print(f"  {tool:<24}{r.per_second:>6.0f}/s {r.cpu_ms:>6.2f} ms   runs: {runs_text}")
    hand, peers = reads[HAND], [t for t in reads if t != HAND]
    for tool in peers:
        print(f"ours (hand shard reader) / {tool}: reads/s x{hand.per_second / reads[tool].per_second:.2f}, "
              f"CPU per read x{hand.cpu_ms / reads[tool].cpu_ms:.2f}")
    print("(the hand reader stays while it is >= 1.5x faster per patch than zarr-python's read)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=[t.name for t in DEFAULT_TASKS], default=DEFAULT_TASKS[0].name)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--scale", type=float, default=2.0, help="voxel grid refinement of the task")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 64, 64], metavar=("Z", "Y", "X"))
    parser.add_argument("--patches", type=int, default=300, help="random patch reads per tool and run")
    parser.add_argument("--chunk-size", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="our ingest's --chunk-size (default: the config's)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and worker count; the fastest counts")
    parser.add_argument("--peers", type=Path, default=ROOT / ".venv-peers", help="venv with nnunetv2")
    parser.add_argument("--without-nnunet", action="store_true", help="our ingest and our two readers only")
    parser.add_argument("--out", type=Path, default=results.RESULTS / "ingest" / "results.json", help="results file")
    return parser


def main() -> None:
    args = _parser().parse_args()
    setup_logging()
    run = results.start()
    peers = None if args.without_nnunet else args.peers
    if peers and not (peers / "bin" / "nnUNetv2_plan_and_preprocess").is_file():
        raise SystemExit(f"{peers}: no nnunetv2 there; create it with the command in this file's docstring, "
                         "or run with --without-nnunet")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        dataset = write_dataset(work / "raw", args.task, args.cases, args.scale)
        runs = []
        for workers in args.workers:
            runs.append(min((run_ours(dataset, work, workers, args.chunk_size)
                             for _ in range(args.repeats)), key=lambda r: r.seconds))
            if peers:
                runs.append(min((run_nnunet(peers, dataset, work, workers) for _ in range(args.repeats)),
                                key=lambda r: r.seconds))
        reads = patch_reads(peers, work / f"ours-{args.workers[0]}" / f"{dataset.name}.zarr",
                            work / f"nnunet-{args.workers[0]}" / dataset.name / "nnUNetPlans_3d_fullres",
                            tuple(args.patch), args.patches, args.repeats)
        raw = raw_mib(dataset)
        print_table(dataset, args.cases, raw, runs, reads)
    results.write(args.out, run, {"dataset": dataset.name, "cases": args.cases, "scale": args.scale,
                                  "patch": args.patch, "patches": args.patches, "repeats": args.repeats,
                                  "chunk_size": args.chunk_size, "raw_mib": raw, "runs": [asdict(r) for r in runs],
                                  "reads": {tool: asdict(r) for tool, r in reads.items()}})


if __name__ == "__main__":
    main()
