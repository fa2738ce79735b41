"""Training start-up, step time and memory with many tasks (2, 11, 50, 200 by default), tiny preset.

Run by hand: `python -m benchmarks.many_tasks [--tasks 2 11 50 200] [--steps 30] [--train 2 200] [--work DIR]`.

Stores: two small synthetic tasks (1-channel CT with 3 classes, 2-channel MR with 3 classes) are
written and ingested with `pipeline.ingest`; the N task stores are copies of them, each with its
own task name in the manifest, so opening them is the real store path (`TaskStore.open`).
Each N is measured in a fresh process (its own peak RSS), with the training code's own pieces,
in the order a worker builds them (`pipeline.train.loop.build_parts`):

- open: `open_stores` (the driver's and every worker's check of all stores, the task table);
- network: spec and network (UniSeg with N prompt slots), `prepare_network`, the optimizer;
- sampler: the task-balanced sampler and one epoch's schedule;
- card: the model card of the N tasks and its JSON;
- loader: the batch stream's opening of every store and its first batch (as a loader worker does);
- step: the median optimizer step (`train_step`, fp32, batch 2, single-task batches drawn by the
  sampler, after 3 warm-up steps), every N's network stepping in turn in one process so that
  other load on the machine falls on all alike (`step_alone_median_s`: each N in its own process);
  batch: the median time the stream takes to make one batch;
- validation: sliding-window validation of one case of the first tasks, seconds per task.

With `--train N ...`, also the real thing for those N: `python -m pipeline.train` (local Ray,
1 worker, 1 epoch of 10 iterations, MLflow SQLite under --work): the whole command's wall time,
the worker's "ready to train after" (its start to its first step), the epoch and the validation of
every task's validation case (from the log); the wall time without the last two bounds start-up
(Ray, MLflow run, stores, worker group, network) plus the end (checkpoint, model logged).

Results: `benchmarks/results/many_tasks/results.json` (`benchmarks/results.py`) and `many_tasks.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "many_tasks"
log = logging.getLogger("benchmarks.many_tasks")


def base_stores(work: Path) -> list[Path]:
    """The two ingested template stores (written once)."""
    from pipeline.datasets.synthetic import SyntheticTask, write_task

    templates = [
        SyntheticTask("Task01_ManyCT", ("CT",), ("background", "liver", "tumour"), spacing=(1.5, 1.5, 4.0),
                      shape=(48, 48, 24), num_cases=4),
        SyntheticTask("Task02_ManyMR", ("T2", "ADC"), ("background", "peripheral zone", "transition zone"),
                      spacing=(1.0, 1.0, 3.0), shape=(48, 48, 24), num_cases=4),
    ]
    out = work / "templates"
    stores = [out / f"{t.name}.zarr" for t in templates]
    if not all(s.exists() for s in stores):
        sources = [write_task(work / "raw", t, layout="msd") for t in templates]
        command = [sys.executable, "-m", "pipeline.ingest", "--out", str(out), "--num-workers", "2"]
        for source in sources:
            command += ["--source", str(source)]
        subprocess.run(command, check=True, cwd=ROOT)
    return stores


def task_stores(work: Path, templates: list[Path], count: int) -> list[str]:
    """`count` stores, copies of the templates in turn, each with its own task name."""
    from pipeline.common.store import TaskStore, open_group
    from pipeline.ingest.writer import write_manifest

    out = work / "tasks"
    uris = []
    for i in range(count):
        store = out / f"Task{i + 1:03d}.zarr"
        if not store.exists():
            template = templates[i % len(templates)]
            shutil.copytree(template, store)
            manifest = TaskStore.open(str(template)).manifest
            write_manifest(open_group(str(store), mode="a"),
                           replace(manifest, task_name=f"Task{i + 1:03d}_{manifest.task_name.split('_', 1)[1]}",
                                   dataset=store.stem))
        uris.append(str(store))
    return uris


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - started


@dataclass
class Worker:
    """What a training worker builds for these stores, and how long each part took."""

    cfg: Any
    stores: list[Any]
    spec: Any
    network: Any
    execution: Any
    optimizer: Any
    batches: Iterator[Any]
    startup_s: dict[str, float]

    def step(self) -> tuple[float, float]:
        """(seconds to make the next batch, seconds of the optimizer step on it)."""
        import torch

        from pipeline.train.step import train_step

        batch, t_batch = timed(next, self.batches)
        device, precision = torch.device("cpu"), self.execution.precision
        _, t_step = timed(train_step, self.network, batch, self.optimizer, precision.scaler(device), device, precision,
                          self.cfg.train.loss, self.cfg.train.grad_clip)
        return t_batch, t_step


def build_worker(uris: list[str]) -> Worker:
    """Stores, network, sampler, card and batch stream, as `pipeline.train.loop.build_parts` builds them."""
    import torch

    from model.presets import build_network
    from pipeline.common.config import config_from_dict
    from pipeline.train.build import model_card, network_spec, open_stores, task_specs
    from pipeline.train.data import BatchStream, open_store
    from pipeline.train.execution import prepare_network
    from pipeline.train.optim import build_optimizer
    from pipeline.train.sampling import build_sampler

    torch.manual_seed(0)
    cfg = config_from_dict({"name": "many-tasks", "data": {"stores": uris},
                            "model": {"preset": "tiny", "architecture": "uniseg"},
                            "train": {"epochs": 1, "iterations_per_epoch": 250, "precision": "fp32"}},
                           source="benchmark")
    stores, t_open = timed(open_stores, cfg.data.stores)
    manifests = [s.manifest for s in stores]

    def network_parts() -> tuple[Any, Any, Any, Any]:
        spec = network_spec(cfg.model, manifests)
        network = build_network(spec, task_specs(manifests))
        execution = prepare_network(network, cfg.train, torch.device("cpu"), [m.in_channels for m in manifests],
                                    spec.strides)
        return spec, network, execution, build_optimizer(network.parameters(), cfg.train)

    (spec, network, execution, optimizer), t_network = timed(network_parts)

    def sampler_parts() -> Any:
        sampler = build_sampler(cfg.train.sampling, [len(s.case_ids("train")) for s in stores],
                                batches=cfg.train.iterations_per_epoch, batch_size=cfg.train.batch_size)
        sampler.schedule(0)
        return sampler

    sampler, t_sampler = timed(sampler_parts)
    _, t_card = timed(lambda: model_card(cfg, spec, manifests, 0).to_json())
    stream = BatchStream(sampler, uris, [m.num_classes for m in manifests], spec.patch_size, epochs=1,
                         opener=open_store)
    batches, t_loader = timed(lambda: (it := iter(stream), [next(it)])[0])
    startup = {"open_stores": t_open, "network": t_network, "sampler": t_sampler, "model_card": t_card,
               "loader_first_batch": t_loader}
    return Worker(cfg, stores, spec, network, execution, optimizer, batches, startup)


def measure(uris: list[str], steps: int, validation_tasks: int) -> dict[str, Any]:
    """Start-up parts, step (alone) and batch times, validation per task and peak RSS for these stores."""
    import torch

    from pipeline.train.validation import ValidationTask, validate

    torch.set_num_threads(1)
    worker = build_worker(uris)
    times = [worker.step() for _ in range(steps)][3:]  # after warm-up
    stores = worker.stores
    shown = [ValidationTask(i, s.manifest.task_name, s.manifest.labels, tuple(s.case_ids("validation")[:1]))
             for i, s in enumerate(stores[:validation_tasks])]
    _, t_validation = timed(validate, worker.network, shown, lambda task, case: stores[task].read_case(case),
                            worker.spec.patch_size)
    network = worker.network
    return {
        "tasks": len(uris),
        "startup_s": worker.startup_s,
        "startup_total_s": sum(worker.startup_s.values()),
        "step_alone_median_s": statistics.median(t for _, t in times),
        "batch_median_s": statistics.median(t for t, _ in times),
        "validation_s_per_task": t_validation / len(shown),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in network.parameters()),
        "prompt_and_fuse_parameters": network.prompt.numel() + sum(p.numel() for p in network.fuse.parameters()),
    }


def interleaved_steps(uris: list[str], counts: list[int], steps: int) -> dict[int, float]:
    """Median optimizer step per task count, the counts stepping in turn in one process, so that
    the load of a shared machine falls on every count alike."""
    import torch

    torch.set_num_threads(1)
    workers = {n: build_worker(uris[:n]) for n in counts}
    times: dict[int, list[float]] = {n: [] for n in counts}
    for i in range(steps):
        for n, worker in workers.items():
            _, t_step = worker.step()
            if i >= 3:  # warm-up
                times[n].append(t_step)
    return {n: statistics.median(t) for n, t in times.items()}


def train_run(work: Path, uris: list[str]) -> dict[str, Any]:
    """`pipeline.train` on these stores, timed; the worker's start-up and validation from its log."""
    import re

    import yaml

    name = f"many-{len(uris)}-{int(time.time())}"
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "name": name, "data": {"stores": uris}, "model": {"preset": "tiny"},
        "train": {"epochs": 1, "iterations_per_epoch": 10, "validate_every": 1, "checkpoint_every": 1,
                  "loader_workers": 1, "precision": "fp32", "log_every": 1000},
        "ray": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(work / "ray")},
        "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "many-tasks",
                   "registered_model": None},
    }))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    text = done.stdout + done.stderr
    (work / f"{name}.log").write_text(text)
    if done.returncode:
        raise RuntimeError(f"pipeline.train with {len(uris)} tasks failed:\n{text[-3000:]}")
    ready = re.search(r"ready to train after ([0-9.]+) s", text)
    epoch = re.search(r"epoch 1/1 done: .* ([0-9.]+) s, run ETA", text)
    validation = re.search(r"epoch 1 validation: .*\(([0-9.]+) s\)", text)
    parts = {key: float(found.group(1)) if found else None
             for key, found in (("worker_ready_s", ready), ("epoch_s", epoch), ("validation_all_tasks_s", validation))}
    rest = wall - (parts["epoch_s"] or 0) - (parts["validation_all_tasks_s"] or 0)
    return {"tasks": len(uris), "command_wall_s": wall, **parts, "wall_minus_epoch_and_validation_s": rest}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [r["tasks"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for part in rows[0]["startup_s"]:
        axes[0].plot(tasks, [r["startup_s"][part] for r in rows], "o-", label=part)
    axes[0].plot(tasks, [r["startup_total_s"] for r in rows], "k^-", label="total")
    axes[0].set(title="start-up (s)", xlabel="tasks", xscale="log")
    axes[0].legend(fontsize=7)
    axes[1].plot(tasks, [1000 * r["step_median_s"] for r in rows], "o-", label="step")
    axes[1].plot(tasks, [1000 * r["batch_median_s"] for r in rows], "s-", label="batch (loader)")
    axes[1].plot(tasks, [1000 * r["validation_s_per_task"] for r in rows], "^-", label="validation per task")
    axes[1].set(title="time (ms)", xlabel="tasks", xscale="log", ylim=(0, None))
    axes[1].legend(fontsize=7)
    axes[2].plot(tasks, [r["peak_rss_mib"] for r in rows], "o-")
    axes[2].set(title="peak RSS (MiB)", xlabel="tasks", xscale="log", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 11, 50, 200])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per N (the first 3 are warm-up)")
    p.add_argument("--validation-tasks", type=int, default=4, help="tasks validated (one case each) per N")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "many_tasks")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--train", type=int, nargs="*", default=[], metavar="N",
                   help="also time pipeline.train end to end with these task counts")
    p.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # child process: measure N tasks, print JSON
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uris = task_stores(args.work, base_stores(args.work),
                       max([*args.tasks, *args.train] if args.measure is None else [args.measure]))
    if args.measure is not None:
        print(json.dumps(measure(uris[: args.measure], args.steps, args.validation_tasks)))
        return 0
    run = results.start()
    rows = []
    for n in args.tasks:
        child = subprocess.run([sys.executable, "-m", "benchmarks.many_tasks", "--measure", str(n), "--steps",
                                str(args.steps), "--validation-tasks", str(args.validation_tasks), "--work",
                                str(args.work)], cwd=ROOT, check=True, capture_output=True, text=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        log.info("%d tasks: %s", n, json.dumps(rows[-1]))
    steps = interleaved_steps(uris, args.tasks, args.steps)
    for row in rows:
        row["step_median_s"] = steps[row["tasks"]]
    log.info("interleaved step medians: %s", steps)
    trained = []
    for n in args.train:
        trained.append(train_run(args.work, uris[:n]))
        log.info("pipeline.train, %d tasks: %s", n, json.dumps(trained[-1]))
    first, last = rows[0], rows[-1]
    values = {"per_tasks": rows, "pipeline_train": trained,
              "step_ratio_last_first": last["step_median_s"] / first["step_median_s"],
              "startup_last_s": last["startup_total_s"]}
    results.write(args.out / "results.json", run, values)
    plot(rows, args.out / "many_tasks.png")
    log.info("step %d tasks / %d tasks: %.3fx; start-up at %d tasks %.1f s; written to %s", last["tasks"],
             first["tasks"], values["step_ratio_last_first"], last["tasks"], last["startup_total_s"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
