"""A new task fine-tuned from the universal model vs. trained from scratch, at equal iterations.

Run by hand, from the repository root: `python -m benchmarks.finetune [--work DIR] [--cases 8] [--epochs 10] [--iterations 30]
[--ft-epochs 6] [--ft-iterations 20] [--patch 16 32 32] [--freeze 1] [--warmup 1] [--decay 0.9]`.

Generates the four default synthetic tasks; the universal tiny UniSeg is trained on three of
them (liver, prostate, brain tumour) and registered; the fourth (spleen, CT) is the new task.
Both arms go through `pipeline.train.finetune.pin_pretrained` and `pipeline.train.run` with the
same recipe and the same number of iterations; the only difference is `finetune.from_scratch` (same plain U-Net, random weights).
Reported: validation Dice of the new task after every epoch (MLflow history) and at the end,
printed and written to `--out` (a results file, `benchmarks/results.py`).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import results
from pipeline.common.config import config_from_dict
from pipeline.common.logs import setup_logging
from pipeline.common.tracking import TrackedRun
from pipeline.train.finetune import pin_pretrained
from pipeline.train.run import run as train_run

log = logging.getLogger("benchmarks.finetune")
NEW_TASK = "Task02_SynthSpleen"


def stores(work: Path, cases: int) -> dict[str, str]:
    from dataclasses import replace

    from pipeline.datasets.synthetic import DEFAULT_TASKS, write_collection

    out = work / "stores"
    tasks = [replace(t, num_cases=cases, num_test_cases=0) for t in DEFAULT_TASKS]
    if not out.exists():
        sources = write_collection(work / "raw", tasks)
        command = [sys.executable, "-m", "pipeline.ingest", "--out", str(out), "--num-workers", "2"]
        for source in sources:
            command += ["--source", str(source)]
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[1])
    return {t.name: str(out / f"{t.name}.zarr") for t in tasks}


def config(args: argparse.Namespace, name: str, stores_: list[str], epochs: int, iterations: int, **extra: dict) -> dict:
    raw = {
        "name": name,
        "data": {"stores": stores_},
        "model": {"preset": "tiny", "patch_size": list(args.patch)},
        "train": {"epochs": epochs, "iterations_per_epoch": iterations, "batch_size": 2, "validate_every": 1,
                  "checkpoint_every": epochs, "loader_workers": 1, "precision": "fp32", "log_every": 1000,
                  "learning_rate": args.lr},
        "ray": {"num_workers": 1, "cpus_per_worker": 2, "storage_path": str(args.work / "ray")},
        "mlflow": {"tracking_uri": f"sqlite:///{args.work / 'mlflow.db'}", "experiment": "finetune-benchmark",
                   "registered_model": f"{name}-model"},
    }
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    return raw


def dice_history(tracking_uri: str, run_id: str, key: str) -> list[float]:
    return [value for _, value in TrackedRun(tracking_uri, run_id).metric_history(key)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("outputs/bench-finetune"))
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--ft-epochs", type=int, default=6)
    p.add_argument("--ft-iterations", type=int, default=20)
    p.add_argument("--patch", type=int, nargs=3, default=(16, 32, 32))
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--freeze", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decay", type=float, default=0.9)
    p.add_argument("--out", type=Path, default=results.RESULTS / "finetune" / "results.json", help="results file")
    args = p.parse_args()
    setup_logging()
    run = results.start(seeds=[0])  # the configs' train.seed default
    args.work = args.work.resolve()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    paths = stores(args.work, args.cases)
    upstream = [s for name, s in paths.items() if name != NEW_TASK]
    stamp = time.strftime("%H%M%S")  # benchmark runs only; pipeline runs are named by config
    started = time.perf_counter()
    universal = train_run(config_from_dict(config(args, f"universal-{stamp}", upstream, args.epochs, args.iterations)))
    universal_s = time.perf_counter() - started
    rows = {}
    for arm, scratch in (("from universal", False), ("from scratch", True)):
        name = f"{'scratch' if scratch else 'transfer'}-{stamp}"
        raw = config(args, name, [paths[NEW_TASK]], args.ft_epochs, args.ft_iterations,
                     finetune={"pretrained": universal.model_uri, "from_scratch": scratch,
                               "freeze_encoder_epochs": 0 if scratch else args.freeze, "warmup_epochs": args.warmup,
                               "layer_decay": 1.0 if scratch else args.decay})
        started = time.perf_counter()
        result = train_run(pin_pretrained(config_from_dict(raw)))
        tracking_uri = raw["mlflow"]["tracking_uri"]
        rows[arm] = {"dice_per_epoch": dice_history(tracking_uri, result.mlflow_run_id, "dice/mean"),
                     "seconds": time.perf_counter() - started, "model": result.model_uri}
    summary = {"setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "universal": {"model": universal.model_uri, "seconds": universal_s,
                             "dice_mean": universal.metrics.get("dice/mean")}, "new_task": NEW_TASK, "arms": rows}
    results.write(args.out, run, summary)
    print(f"\n{'arm':16} " + " ".join(f"ep{e + 1:<5}" for e in range(args.ft_epochs)) + "  seconds")
    for arm, row in rows.items():
        print(f"{arm:16} " + " ".join(f"{d:<7.3f}" for d in row["dice_per_epoch"]) + f"  {row['seconds']:.0f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
