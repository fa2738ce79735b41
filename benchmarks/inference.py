"""Sliding-window inference of one scan: ours next to nnU-Net v2's, same network.

Run by hand. nnU-Net lives in its own venv (a different torch); set it up once:

    python3 -m venv .venv-peers && echo '*' > .venv-peers/.gitignore \\
        && .venv-peers/bin/pip install torch==2.14.1 torchvision==0.29.1 nnunetv2

then `python -m benchmarks.inference [--presets tiny uniseg-paper] [--tta off on]
[--threads 1] [--device auto]`.

One randomly initialised UniSeg (seed 0; one task, 3 classes, 1 channel) per preset and one
random scan (seed 1; `--tiny-scan` / `--paper-scan` voxels, z y x) go through:

- ours: `pipeline.common.inference.predict_probabilities` (MONAI's `sliding_window_inference`,
  gaussian blend of softmax, mirroring per window batch, stitching on the CPU; until issue 20
  ours had its own nnU-Net-style tiler, level with MONAI's: x0.91-1.03 on CPU, x1.02-1.06 on an
  H200, so MONAI's replaced it);
- nnU-Net v2: `nnUNetPredictor.predict_sliding_window_return_logits` (its tiling, gaussian
  blend of logits in float16, mirroring per window; one window per forward pass; stitching on
  the device), the network wrapped to return the task's logits.

All use overlap 0.5, the preset's patch and, with `--tta on`, mirroring over z, y and x (8
passes). Each measurement runs in a fresh process after one untimed forward pass: voxels/s of
the scan (wall clock), voxels per CPU second (process CPU time, all threads: the stable figure on
a shared machine), and peak memory above the process's memory just before the call (RSS sampled
every 5 ms on the CPU; `max_memory_allocated` on CUDA).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import results  # noqa: E402 (after the path, for the peers venv)
from model.presets import PRESETS, build_network  # noqa: E402
from model.tasks import TaskSpec  # noqa: E402

log = logging.getLogger("benchmarks.inference")
NUM_CLASSES = 3
OVERLAP = 0.5
IMPLEMENTATIONS = ("ours", "nnunet")
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
Predict = Callable[[torch.Tensor], torch.Tensor]


class TaskLogits(nn.Module):
    """The network as a one-input module returning the task's full-resolution logits."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x, 0)[0][:, :NUM_CLASSES]


def _ours(network: TaskLogits, patch: tuple[int, ...], mirror: bool, batch: int, device: torch.device) -> Predict:
    from pipeline.common.inference import InferenceOptions, predict_probabilities

    options = InferenceOptions(overlap=OVERLAP, mirror_axes=(0, 1, 2) if mirror else (), window_batch_size=batch)
    return lambda image: predict_probabilities(network.network, image, 0, NUM_CLASSES, patch, options)


def _nnunet(network: TaskLogits, patch: tuple[int, ...], mirror: bool, batch: int, device: torch.device) -> Predict:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=OVERLAP, use_gaussian=True, use_mirroring=mirror,
                                perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=False)
    predictor.network = network
    predictor.configuration_manager = SimpleNamespace(patch_size=list(patch))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=NUM_CLASSES)
    predictor.allowed_mirroring_axes = (0, 1, 2)
    return predictor.predict_sliding_window_return_logits


BUILDERS = {"ours": _ours, "nnunet": _nnunet}


class PeakMemory:
    """Peak RSS (CPU) or allocated memory (CUDA) above the level when entered, in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self._base)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss() - self._base)


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One timed run (in a fresh process): seconds, voxels/s and peak memory."""
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    torch.manual_seed(0)
    spec = PRESETS[job["preset"]]
    network = TaskLogits(build_network(spec, [TaskSpec("bench", NUM_CLASSES, 1)])).to(device).eval()
    image = torch.randn((1, *job["scan"]), generator=torch.Generator().manual_seed(1))
    predict = BUILDERS[job["implementation"]](network, spec.patch_size, job["tta"], job["window_batch_size"], device)
    with torch.no_grad():
        network(torch.zeros((1, 1, *spec.patch_size), device=device))  # untimed: allocator, kernels
    with torch.no_grad(), PeakMemory(device) as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        predict(image)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    voxels = int(torch.tensor(job["scan"]).prod())
    return {**job, "seconds": seconds, "cpu_seconds": cpu_seconds, "voxels_per_s": voxels / seconds,
            "voxels_per_cpu_s": voxels / cpu_seconds, "peak_mib": memory.peak / 2**20}


@dataclass(frozen=True)
class Row:
    preset: str
    tta: bool
    implementation: str
    seconds: float
    cpu_seconds: float
    voxels_per_s: float
    voxels_per_cpu_s: float
    peak_mib: float


def _run(job: dict[str, Any]) -> Row | None:
    python = str(PEERS_PYTHON) if job["implementation"] == "nnunet" else sys.executable
    if job["implementation"] == "nnunet" and not PEERS_PYTHON.exists():
        log.warning("no %s: nnU-Net v2 skipped (see the docstring to create it)", PEERS_PYTHON)
        return None
    log.info("%s, TTA %s, %s ...", job["preset"], "on" if job["tta"] else "off", job["implementation"])
    done = subprocess.run([python, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{job['implementation']} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Row(job["preset"], job["tta"], job["implementation"], result["seconds"], result["cpu_seconds"],
               result["voxels_per_s"], result["voxels_per_cpu_s"], result["peak_mib"])


def _print_table(rows: list[Row], scans: dict[str, tuple[int, ...]], args: argparse.Namespace) -> None:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\nsliding window, overlap {OVERLAP}, window batch {args.window_batch_size} (nnU-Net: 1), device "
          f"{args.device}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average {load}")
    for preset, scan in scans.items():
        print(f"{preset}: patch {PRESETS[preset].patch_size}, scan {scan}")
    print(f"\n{'preset':<14}{'TTA':<5}{'implementation':<16}{'wall s':>9}{'CPU s':>9}{'Mvox/s':>9}"
          f"{'Mvox/CPU s':>12}{'peak MiB':>10}")
    for r in rows:
        print(f"{r.preset:<14}{'on' if r.tta else 'off':<5}{r.implementation:<16}{r.seconds:>9.2f}{r.cpu_seconds:>9.2f}"
              f"{r.voxels_per_s / 1e6:>9.3f}{r.voxels_per_cpu_s / 1e6:>12.3f}{r.peak_mib:>10.0f}")
    print("\nratio ours / peer (speed: > 1 is faster; memory: < 1 is leaner)")
    for (preset, tta), group in itertools.groupby(rows, key=lambda r: (r.preset, r.tta)):
        by_name = {r.implementation: r for r in group}
        ours = by_name.get("ours")
        for peer in (p for p in ("nnunet",) if p in by_name and ours):
            other = by_name[peer]
            print(f"{preset:<14}TTA {'on ' if tta else 'off'} vs {peer:<7}"
                  f" wall x{ours.voxels_per_s / other.voxels_per_s:.2f},"
                  f" CPU x{ours.voxels_per_cpu_s / other.voxels_per_cpu_s:.2f},"
                  f" peak memory x{ours.peak_mib / max(other.peak_mib, 1e-9):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--presets", nargs="+", default=["tiny", "uniseg-paper"], choices=list(PRESETS))
    parser.add_argument("--tta", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--tiny-scan", type=int, nargs=3, default=[96, 192, 192], metavar=("Z", "Y", "X"))
    parser.add_argument("--paper-scan", type=int, nargs=3, default=[64, 192, 192], metavar=("Z", "Y", "X"))
    parser.add_argument("--window-batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run (1: robust on a busy machine)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", "--json", type=Path, default=results.RESULTS / "inference" / "results.json",
                        help="results file")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run = results.start(seeds=[0, 1])  # network, scan
    scans = {p: tuple(args.tiny_scan if p == "tiny" else args.paper_scan) for p in args.presets}
    rows = []
    for preset, tta, implementation in itertools.product(args.presets, args.tta, args.implementations):
        job = {"preset": preset, "tta": tta == "on", "implementation": implementation, "scan": scans[preset],
               "window_batch_size": args.window_batch_size, "threads": args.threads, "device": args.device}
        rows += [row] if (row := _run(job)) else []
    _print_table(rows, scans, args)
    results.write(args.out, run, {"scans": scans, "overlap": OVERLAP, "window_batch_size": args.window_batch_size,
                                  "threads": args.threads, "device": args.device, "rows": [r.__dict__ for r in rows]})


if __name__ == "__main__":
    main()
