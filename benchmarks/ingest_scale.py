"""Ingest at scale: per-case time and peak memory of our ingest as the case count grows 10x.

    python benchmarks/ingest_scale.py --sizes 60 200 600 --workers 1 2 [--cluster] \\
        [--nnunet-sizes 60 200] [--scale 4] [--work DIR]

CT-like cases of the synthetic liver task (`benchmarks/ingest.py`'s dataset, its grid `--scale`
times finer: 4 gives 256x256x128 with labels) are written once for the largest size; each smaller
size is a folder of symlinks to its first cases. For every size and worker count our ingest runs
as `python -m pipeline.ingest --num-workers N` (a local Dask cluster); with `--cluster`, also with
Dask on Ray over the simulated three-node cluster of `cluster/simulate.py` (`--on-ray`, its
2 worker nodes and head: 4 CPUs of Ray on this machine). nnU-Net v2's
`nnUNetv2_plan_and_preprocess` runs on `--nnunet-sizes` (its venv: `--peers`, default
/work/nnunet-venv or .venv-peers) with the same worker counts, in the same run.

Per run: wall time, CPU time, peak PSS and disk bytes read and written (psutil io_counters:
storage I/O, page-cache hits are not reads) of the whole process tree, sampled every 0.1 s (the
ingest process and its descendants; with `--cluster` also the Ray nodes' processes, every one
a child of this process, counted from the run's start). Results: JSON and PNG under
`benchmarks/results/ingest_scale/` (`--results`), provenance by benchmarks/results.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import results  # noqa: E402
from benchmarks.ingest import DATASET_ID, raw_mib, write_dataset  # noqa: E402
from cluster.simulate import detached_cluster  # noqa: E402
from pipeline.common.logs import setup_logging  # noqa: E402

log = logging.getLogger("benchmarks.ingest_scale")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ingest_scale"
SAMPLE_S = 0.1


@dataclass(frozen=True)
class Usage:
    seconds: float
    cpu_seconds: float
    peak_mib: float
    read_mib: float
    written_mib: float


@dataclass(frozen=True)
class Row:
    tool: str  # "ours", "ours, Dask on Ray (3 nodes)" or "nnU-Net v2"
    cases: int
    workers: int  # Dask workers / nnU-Net processes; Ray CPUs under --cluster
    usage: Usage
    out_mib: float

    @property
    def per_case_s(self) -> float:
        return self.usage.seconds / self.cases


class TreeMeter:
    """Samples a set of process trees: peak summed PSS, and CPU and disk I/O per process, the
    last value seen of each (a process that ends between samples loses at most one interval)."""

    def __init__(self, roots: Callable[[], list[psutil.Process]]):
        self.roots = roots
        self.base = self._counters()
        self.last: dict[int, tuple[float, int, int]] = {}
        self.peak = 0

    def _tree(self) -> Iterator[psutil.Process]:
        for root in self.roots():
            yield root
            try:
                yield from root.children(recursive=True)
            except psutil.NoSuchProcess:
                continue

    def _counters(self) -> dict[int, tuple[float, int, int]]:
        counters = {}
        for p in self._tree():
            try:
                with p.oneshot():
                    cpu, io = p.cpu_times(), p.io_counters()
                counters[p.pid] = (cpu.user + cpu.system, io.read_bytes, io.write_bytes)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return counters

    def sample(self) -> None:
        pss = 0
        for p in self._tree():
            try:
                pss += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak = max(self.peak, pss)
        self.last.update(self._counters())

    def usage(self, seconds: float) -> Usage:
        totals = [0.0, 0.0, 0.0]
        for pid, values in self.last.items():
            before = self.base.get(pid, (0.0, 0, 0))
            for i in range(3):
                totals[i] += values[i] - before[i]
        return Usage(seconds, totals[0], self.peak / 2**20, totals[1] / 2**20, totals[2] / 2**20)


def measure(command: list[str], env: dict[str, str], others: Callable[[], list[psutil.Process]] = list) -> Usage:
    """Run `command` to its end, sampling it, its descendants and the processes `others` names."""
    log.info("%s", " ".join(command))
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        process = psutil.Process(child.pid)
        meter = TreeMeter(lambda: [process, *others()])
        while child.poll() is None:
            meter.sample()
            time.sleep(SAMPLE_S)
        seconds = time.perf_counter() - start
        if child.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"{command[0]} exited with {child.returncode}:\n"
                               f"{stderr.read().decode(errors='replace')[-3000:]}")
    return meter.usage(seconds)


def subset(dataset: Path, cases: int, root: Path) -> Path:
    """A dataset folder holding the first `cases` training cases of `dataset`, as symlinks."""
    folder = root / f"size-{cases}" / dataset.name
    if folder.exists():
        return folder
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
        for path in sorted((dataset / sub).glob("*.nii.gz"))[:cases]:
            (folder / sub / path.name).symlink_to(path)
    meta = json.loads((dataset / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps(meta | {"numTraining": cases}, indent=2))
    return folder


def _size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def run_ours(dataset: Path, out: Path, workers: int, on_ray: bool = False) -> tuple[Usage, float]:
    shutil.rmtree(out, ignore_errors=True)  # a rerun would skip every unchanged case
    command = [sys.executable, "-m", "pipeline.ingest", "--source", str(dataset), "--out", str(out),
               *(["--on-ray"] if on_ray else ["--num-workers", str(workers)])]
    others = _cluster_processes if on_ray else list
    usage = measure(command, dict(os.environ), others)
    size = _size_mib(out)
    shutil.rmtree(out)
    return usage, size


def _cluster_processes() -> list[psutil.Process]:
    """This process's children that are not ingest runs: the simulated cluster's node processes."""
    return [p for p in psutil.Process().children() if "pipeline.ingest" not in " ".join(_cmdline(p))]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def run_nnunet(peers: Path, dataset: Path, out: Path, workers: int) -> tuple[Usage, float]:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, nnUNet_raw=str(dataset.parent), nnUNet_preprocessed=str(out),
               nnUNet_results=str(out / "results"))
    command = [str(peers / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID),
               "-c", "3d_fullres", "-npfp", str(workers), "-np", str(workers)]
    usage = measure(command, env)
    size = _size_mib(out)
    shutil.rmtree(out)
    return usage, size


def summary(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per tool and worker count: largest / smallest size's per-case time and peak memory."""
    out = {}
    for tool, workers in sorted({(r.tool, r.workers) for r in rows}):
        group = sorted((r for r in rows if (r.tool, r.workers) == (tool, workers)), key=lambda r: r.cases)
        if len(group) > 1:
            small, large = group[0], group[-1]
            out[f"{tool}, {workers} worker(s)"] = {
                "cases": [small.cases, large.cases],
                "per_case_time_ratio": large.per_case_s / small.per_case_s,
                "peak_memory_ratio": large.usage.peak_mib / small.usage.peak_mib}
    for r in rows:
        if r.tool != "nnU-Net v2":
            continue
        ours = next((o for o in rows if (o.tool, o.cases, o.workers) == ("ours", r.cases, r.workers)), None)
        if ours:
            out[f"ours / nnU-Net v2, {r.cases} cases, {r.workers} worker(s)"] = {
                "time_ratio": ours.usage.seconds / r.usage.seconds,
                "cpu_ratio": ours.usage.cpu_seconds / r.usage.cpu_seconds,
                "peak_memory_ratio": ours.usage.peak_mib / r.usage.peak_mib}
    return out


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for tool, workers in sorted({(r.tool, r.workers) for r in rows}):
        group = sorted((r for r in rows if (r.tool, r.workers) == (tool, workers)), key=lambda r: r.cases)
        label = f"{tool}, {workers} worker(s)"
        left.plot([r.cases for r in group], [r.per_case_s for r in group], "o-", label=label)
        right.plot([r.cases for r in group], [r.usage.peak_mib for r in group], "o-", label=label)
    for ax, title in ((left, "wall seconds per case"), (right, "peak PSS of the process tree (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("cases")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[60, 200, 600])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cluster", action="store_true", help="also Dask on Ray over the simulated 3-node cluster")
    parser.add_argument("--nnunet-sizes", type=int, nargs="*", default=None,
                        help="sizes nnU-Net v2 runs on (default: the two smallest; none: skip)")
    parser.add_argument("--scale", type=float, default=4.0, help="grid refinement of the 64x64x32 liver task")
    parser.add_argument("--peers", type=Path, default=None, help="venv with nnunetv2")
    parser.add_argument("--work", type=Path, help="folder for the data (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    return parser


def _peers(given: Path | None) -> Path:
    for candidate in ([given] if given else [ROOT / ".venv-peers", Path("/work/nnunet-venv")]):
        if (candidate / "bin" / "nnUNetv2_plan_and_preprocess").is_file():
            return candidate
    raise SystemExit(f"{given or '.venv-peers, /work/nnunet-venv'}: no nnunetv2 there (see benchmarks/ingest.py)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    setup_logging()
    sizes = sorted(args.sizes)
    nnunet_sizes = sizes[:2] if args.nnunet_sizes is None else args.nnunet_sizes
    peers = _peers(args.peers) if nnunet_sizes else None
    run = results.start()
    with (nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="bench-scale-")) as work:
        work = Path(work)
        full = work / "raw" / f"Dataset{DATASET_ID}_SynthLiver"
        if not (full / "dataset.json").is_file():
            shutil.rmtree(full, ignore_errors=True)
            write_dataset(work / "raw", "Task01_SynthLiver", sizes[-1], args.scale)
        rows: list[Row] = []
        for cases in sizes:
            dataset = subset(full, cases, work)
            for workers in args.workers:
                rows.append(Row("ours", cases, workers, *run_ours(dataset, work / "out", workers)))
                if peers and cases in nnunet_sizes:
                    rows.append(Row("nnU-Net v2", cases, workers, *run_nnunet(peers, dataset, work / "nnunet", workers)))
                log.info("%s", rows[-1])
        if args.cluster:
            with detached_cluster() as cpus:
                for cases in sizes:
                    usage, out = run_ours(subset(full, cases, work), work / "out", cpus, on_ray=True)
                    rows.append(Row("ours, Dask on Ray (3 nodes)", cases, cpus, usage, out))
        first = next((full / "imagesTr").glob("*.nii.gz"))
        record = {"case_shape": list(nib.load(first).shape),
                   "raw_mib_per_case": raw_mib(subset(full, sizes[0], work)) / sizes[0],
                   "rows": [asdict(r) | {"per_case_s": r.per_case_s} for r in rows], "summary": summary(rows)}
    results.write(args.results / "results.json", run, record)
    plot(rows, args.results / "ingest_scale.png")
    print(json.dumps(record["summary"], indent=2))


if __name__ == "__main__":
    main()
