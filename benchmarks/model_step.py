"""Forward+backward step of each preset and architecture: time, peak memory, achieved GFLOP/s.

Run by hand, from the repository root: `python -m benchmarks.model_step [--presets tiny uniseg-paper]
[--repeats 3]`; the figures also go to `--out` (a results file, `benchmarks/results.py`).
Each configuration runs in its own process so its peak memory is its own. Next to the
figures, the GFLOP/s of a plain float32 torch matmul measured in the same run: the practical
limit of this machine, printed as a ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import results
from model.presets import REFERENCE_TASKS, build_network, preset_spec
from model.summary import forward_flops

ARCHITECTURES = ("uniseg", "multihead", "dodnet")


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def measure_step(preset: str, architecture: str, batch_size: int, repeats: int, device: str) -> dict:
    """Seconds per forward+backward step and peak memory of one configuration."""
    spec = preset_spec(preset, architecture=architecture)
    torch.manual_seed(0)
    network = build_network(spec, REFERENCE_TASKS).to(device).train()
    x = torch.randn(batch_size, 1, *spec.patch_size, device=device)
    target = torch.randint(0, 2, (batch_size, *spec.patch_size), device=device)

    def step() -> None:
        network.zero_grad(set_to_none=True)
        with torch.autocast(device, enabled=device == "cuda"):
            loss = F.cross_entropy(network(x, 0)[0].float(), target)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = 3 * forward_flops(spec, REFERENCE_TASKS, batch_size)  # backward ~ 2x forward
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"preset": preset, "architecture": architecture, "seconds": seconds, "gflops": flops / seconds / 1e9, "peak_mib": peak_mib}


def run_isolated(args: argparse.Namespace, preset: str, architecture: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.model_step", "--single", preset, architecture, "--batch-size", str(args.batch_size),
               "--repeats", str(args.repeats), "--device", args.device]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True, cwd=results.ROOT).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "uniseg-paper"])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=results.RESULTS / "model_step" / "results.json",
                        help="results file")
    parser.add_argument("--single", nargs=2, metavar=("PRESET", "ARCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(measure_step(*args.single, args.batch_size, args.repeats, args.device)))
        return
    run = results.start(seeds=[0])  # measure_step's network seed
    peak = matmul_gflops() if args.device == "cpu" else float("nan")
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    print(f"plain float32 matmul 2048^3: {peak:.1f} GFLOP/s (practical limit)")
    print(f"{'preset':<14}{'architecture':<14}{'s/step':>9}{'GFLOP/s':>10}{'of matmul':>11}{'peak MiB':>10}")
    rows = []
    for preset in args.presets:
        for architecture in args.architectures:
            rows.append(r := run_isolated(args, preset, architecture))
            print(f"{preset:<14}{architecture:<14}{r['seconds']:>9.3f}{r['gflops']:>10.1f}"
                  f"{r['gflops'] / peak:>10.0%} {r['peak_mib']:>10.0f}")
    results.write(args.out, run, {"device": args.device, "torch_threads": torch.get_num_threads(),
                                  "batch_size": args.batch_size, "repeats": args.repeats,
                                  "matmul_gflops": peak if args.device == "cpu" else None, "rows": rows})


if __name__ == "__main__":
    main()
