"""README tables rendered from the benchmarks' results files, so a figure cannot drift from its data.

A table in a README sits between two markers naming its results file and its renderer:

    <!-- results: benchmarks/results/loader/results.json table=loader -->
    ...generated; do not edit...
    <!-- /results -->

Extra `key=value` words in the opening marker go to the renderer (`table=cv scores=test`).

    python -m benchmarks.tables            # rewrite every marked table in README.md and benchmarks/README.md
    python -m benchmarks.tables --check    # exit status 1 and one line per table that differs

Adding a table: a function `(data: dict, **options) -> str` registered with `@renderer("name")`,
and a marker in the README.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.results import ROOT, read

log = logging.getLogger("benchmarks.tables")
READMES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
BLOCK = re.compile(r"(?P<open><!-- results: (?P<args>[^>]*?) -->\n)(?P<body>.*?)(?P<close><!-- /results -->)", re.S)
NO_FIGURES = "<!-- no-figures -->"
DECIMAL = re.compile(r"\d\.\d")
RENDERERS: dict[str, Callable[..., str]] = {}


def renderer(name: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    def register(function: Callable[..., str]) -> Callable[..., str]:
        RENDERERS[name] = function
        return function
    return register


def caption(provenance: dict[str, Any]) -> str:
    """Where and how the figures below were measured, from a results file's provenance block."""
    machine = provenance.get("machine", {})
    loads = [machine[k][0] for k in ("load_average_before", "load_average_after") if machine.get(k)]
    load = provenance.get("load_note") or (
        "load average " + " to ".join(dict.fromkeys(f"{v:.1f}" for v in loads)) if loads else "load not recorded")
    gpu = machine.get("gpu") or "no GPU"
    cpu = f"{machine.get('cpus', '?')} CPUs" + (f" ({machine['cpu_model']})" if machine.get("cpu_model") else "")
    commit = provenance.get("commit") or "unknown commit"
    if provenance.get("dirty"):
        commit += " + uncommitted changes"
    date = (provenance.get("started") or "")[:10] or "date not recorded"
    seeds = provenance.get("seeds")
    seeded = f", seeds {', '.join(map(str, seeds))}" if seeds else ""
    torch = f", torch {machine['torch']}" if machine.get("torch") else ""
    return (f"_Run {date} on {commit}: {cpu}, {load}, {gpu}{torch}{seeded}; "
            f"`{provenance.get('command', 'command not recorded')}`._")


def _table(header: list[str], rows: list[list[str]], align: str) -> str:
    """A markdown table; `align` has one letter per column, l or r."""
    rule = "|".join("---" if a == "l" else "---:" for a in align)
    return "\n".join([f"| {' | '.join(header)} |", f"|{rule}|", *(f"| {' | '.join(r)} |" for r in rows)])


@renderer("loader")
def loader_table(data: dict[str, Any]) -> str:
    """benchmarks/loader.py: samples/s per core, CPU ms per sample, cores per GPU, ours / nnU-Net."""
    gpu = data["gpu_samples_per_s"]
    arms = [("ours_loader", "ours"), ("ours_device", "ours, augmentation on the device"), ("nnunet", "nnU-Net v2")]
    rows = []
    for row in data["rows"]:
        patch = "x".join(map(str, row["patch"]))
        for key, label in arms:
            if key in row:
                per_s, cpu_ms = row[key]
                rows.append([patch, label, f"{per_s:.2f}", f"{cpu_ms:.0f}", f"{row['cores_per_gpu'][key]:.2f}"])
        if "ours_over_nnunet" in row:
            rows.append([patch, "ours / nnU-Net", f"x{row['ours_over_nnunet']:.2f}", "", ""])
    return _table(["patch", "loader", "samples/s per core", "CPU ms per sample", f"cores per GPU ({gpu} samples/s)"],
                  rows, "llrrr")


@renderer("real_accuracy_seeds")
def real_accuracy_seeds_table(data: dict[str, Any]) -> str:
    """benchmarks/real_accuracy.py's seeds summary: test Dice mean ± std over seeds, both tools."""
    rows = [[str(b["budget"]), b["task"], ", ".join(map(str, b["seeds"])),
             f"{b['ours']['mean']:.3f} ± {b['ours']['std']:.3f}", f"{b['nnunet']['mean']:.3f} ± {b['nnunet']['std']:.3f}",
             f"{b['difference']['mean']:+.3f} ± {b['difference']['std']:.3f}"] for b in data["budgets"]]
    return _table(["iterations", "task", "seeds", "ours", "nnU-Net v2", "ours - nnU-Net (paired)"], rows, "rllrrr")


CV_LABELS = {"uniseg": "UniSeg (paper)", "uniseg-last-stage": "UniSeg + prompt at the last stage",
             "multihead": "multi-head", "dodnet": "DoDNet-style", "single": "single-task nets"}


def _cv_models(data: dict[str, Any]) -> dict[str, str]:
    """Statistics key -> row label, in the results' order (single-task nets last)."""
    names = {r["name"]: r["model"] for r in data["results"] if r["task"] is None} | {"single": "single"}
    return {name: CV_LABELS.get(model, model) for name, model in names.items()}


@renderer("cv")
def cv_table(data: dict[str, Any], scores: str = "test", figures: str = "dice") -> str:
    """benchmarks/train_accuracy.py --folds: per model and task, Dice mean ± std over folds
    (`figures=dice`, with the training minutes) or the paired difference to the single-task nets
    (`figures=difference`, `*` where it is larger than its std); `scores` is out_of_fold or test."""
    statistics = data["statistics"][scores]
    tasks = [t for t in next(iter(statistics.values())) if t != "mean"]
    short = [t.split("_", 1)[-1].removeprefix("Synth") for t in tasks]
    minutes = {r["name"]: r["seconds"] / 60 for r in data["results"] if r["task"] is None}
    minutes["single"] = sum(r["seconds"] for r in data["results"] if r["task"] is not None) / 60
    rows = []
    for name, label in _cv_models(data).items():
        stats = statistics.get(name)
        if stats is None:
            continue
        if figures == "dice":
            cells = [f"{stats[t]['mean']:.3f} ± {stats[t]['std']:.3f}" for t in [*tasks, "mean"]]
            rows.append([label, *cells, f"{minutes[name]:.1f}"])
        elif "difference_mean" in stats["mean"]:
            cells = [f"{stats[t]['difference_mean']:+.3f} ± {stats[t]['difference_std']:.3f}"
                     f"{' *' if stats[t]['exceeds'] else ''}" for t in [*tasks, "mean"]]
            rows.append([label, *cells])
    first = "model" if figures == "dice" else "minus single-task, paired by fold"
    header = [first, *short, "mean over tasks"] + (["train min"] if figures == "dice" else [])
    return _table(header, rows, "l" + "r" * (len(header) - 1))


def _nan_or(value: float | None, spec: str) -> str:
    return "" if value is None or value != value else format(value, spec)


@renderer("model_step")
def model_step_table(data: dict[str, Any]) -> str:
    """benchmarks/model_step.py: seconds per forward+backward step, GFLOP/s, peak memory."""
    peak = data.get("matmul_gflops")
    rows = [[r["preset"], r["architecture"], f"{r['seconds']:.3f}", f"{r['gflops']:.1f}",
             f"{r['gflops'] / peak:.0%}" if peak else "", f"{r['peak_mib']:.0f}"] for r in data["rows"]]
    return _table(["preset", "architecture", "s per step", "GFLOP/s", f"of matmul ({_nan_or(peak, '.1f')} GFLOP/s)",
                   "peak MiB"], rows, "llrrrr")


@renderer("train_step")
def train_step_table(data: dict[str, Any]) -> str:
    """benchmarks/train_step.py: the full step on N Ray workers beside the loader and the model alone."""
    loader = ", ".join(f"{v:.1f} with {w} loader workers" for w, v in data["loader_only_samples_per_s"].items())
    rows = [[str(r["workers"]), f"{r['samples_per_s']:.1f}", f"{r['samples_per_s'] / r['workers']:.1f}",
             f"{100 * r['data_wait']:.0f} %", f"{r['scaling_efficiency']:.2f}", f"{r['peak_rss_mib']:.0f}",
             f"{r['peak_loader_rss_mib']:.0f}"] for r in data["full_step"]]
    head = (f"{data['preset']} {data['architecture']}, patch {data['patch']}, batch {data['batch_size']} per worker, "
            f"{data['device']}; loader alone {loader} samples/s; model alone "
            f"{data['model_only_samples_per_s']:.1f} samples/s\n\n")
    return head + _table(["Ray workers", "samples/s", "per worker", "data wait", "efficiency", "peak RSS MiB",
                          "loader RSS MiB"], rows, "rrrrrrr")


@renderer("model_only")
def model_only_table(data: dict[str, Any]) -> str:
    """benchmarks/train_step.py --model-only: the model step alone per step setting."""
    rows = [[r["setting"], f"{r['samples_per_s']:.1f}", f"{r['epoch_seconds']:.0f}", _nan_or(r["peak_gpu_gib"], ".1f"),
             f"{r['tflops_per_s']:.3g}", _nan_or(r["mfu"], ".1%"), f"{r['warmup_seconds']:.0f}"]
            for r in data["settings"]]
    head = f"{data['preset']} {data['architecture']}, patch {data['patch']}, batch {data['batch_size']}, {data['device']}\n\n"
    return head + _table(["setting", "samples/s", "epoch of 550 it, s", "peak GPU GiB", "TFLOP/s", "MFU",
                          "warm-up s"], rows, "lrrrrrr")


@renderer("inference")
def inference_table(data: dict[str, Any]) -> str:
    """benchmarks/inference.py: voxels per wall and CPU second and peak memory per preset, TTA and tool."""
    rows = [[r["preset"], "on" if r["tta"] else "off", r["implementation"], f"{r['seconds']:.2f}",
             f"{r['cpu_seconds']:.2f}", f"{r['voxels_per_s'] / 1e6:.3f}", f"{r['voxels_per_cpu_s'] / 1e6:.3f}",
             f"{r['peak_mib']:.0f}"] for r in data["rows"]]
    scans = "; ".join(f"{p}: scan {' x '.join(map(str, s))}" for p, s in data["scans"].items())
    return f"{scans}; device {data['device']}, {data['threads']} thread(s)\n\n" + _table(
        ["preset", "TTA", "implementation", "wall s", "CPU s", "Mvox/s", "Mvox/CPU s", "peak MiB"], rows, "lllrrrrr")


@renderer("ingest")
def ingest_table(data: dict[str, Any]) -> str:
    """benchmarks/ingest.py: ingest per tool and worker count, then patch reads (median and range of runs)."""
    cases, raw = data["cases"], data["raw_mib"]
    rows = [[r["tool"], str(r["workers"]), f"{r['seconds']:.1f}", f"{cases / r['seconds']:.2f}",
             f"{raw / r['seconds']:.1f}", f"{r['peak_mib']:.0f}", f"{r['cpu_seconds']:.1f}", f"{r['out_mib']:.1f}"]
            for r in data["runs"]]
    reads = [[tool, f"{r['per_second']:.0f}", f"{min(r['runs']):.0f} to {max(r['runs']):.0f}", f"{r['cpu_ms']:.2f}"]
             for tool, r in data["reads"].items()]
    return (f"{data['dataset']}: {cases} cases, {raw:.0f} MiB of raw voxels\n\n"
            + _table(["tool", "workers", "wall s", "cases/s", "MiB/s", "peak MiB", "CPU s", "out MiB"], rows, "lrrrrrrr")
            + "\n\n" + _table(["patch reader", "reads/s (median)", "reads/s (runs)", "CPU ms per read"], reads, "lrrr"))


@renderer("finetune")
def finetune_table(data: dict[str, Any]) -> str:
    """benchmarks/finetune.py: validation Dice of the new task after each epoch, per arm."""
    epochs = max(len(a["dice_per_epoch"]) for a in data["arms"].values())
    rows = [[arm, *(f"{d:.3f}" for d in a["dice_per_epoch"]), f"{a['seconds']:.0f}"] for arm, a in data["arms"].items()]
    return _table(["arm", *(f"ep {e + 1}" for e in range(epochs)), "wall s"], rows, "l" + "r" * (epochs + 1))


@renderer("demo_training")
def demo_training_table(data: dict[str, Any]) -> str:
    """benchmarks/demo_training.py: training wall time per variant against the first, Dice of the evaluation."""
    base = data["variants"][0]["train_seconds"]
    rows = []
    for v in data["variants"]:
        dice = v["dice"]
        rows.append([v["variant"], str(v["iterations"]), f"{v['train_seconds'] / 60:.1f}", f"x{v['train_seconds'] / base:.2f}",
                     f"{v['samples_per_s']:.2f}", f"{dice['Task10_RealCT']['liver']:.3f}",
                     f"{dice['Task01_SynthLiver']['liver']:.3f}",
                     f"{v['load_before'][0]:.1f}-{v['load_after'][0]:.1f}"])
    return _table(["variant", "iterations", "train min", "x first", "samples/s", "real CT liver Dice",
                   "synthetic liver Dice", "load average"], rows, "lrrrrrrl")


@renderer("many_tasks")
def many_tasks_table(data: dict[str, Any]) -> str:
    """benchmarks/many_tasks.py: start-up, step, memory and validation per task count."""
    first = data["per_tasks"][0]["step_median_s"]
    rows = [[str(r["tasks"]), f"{r['startup_total_s']:.1f}", f"{r['startup_s']['network']:.1f}",
             f"{r['step_median_s']:.2f}", f"x{r['step_median_s'] / first:.2f}", f"{r['batch_median_s']:.2f}",
             f"{r['validation_s_per_task']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['parameters'] / 1e6:.2f} M"]
            for r in data["per_tasks"]]
    return _table(["tasks", "start-up s", "of which network s", "step s", "x first", "batch s",
                   "validation s per task", "peak RSS MiB", "parameters"], rows, "rrrrrrrrr")


@renderer("ingest_scale")
def ingest_scale_table(data: dict[str, Any]) -> str:
    """benchmarks/ingest_scale.py: per run wall and CPU time per case and peak memory, then the
    largest / smallest size's ratios and ours / nnU-Net v2 at the sizes both ran."""
    shape = " x ".join(map(str, sorted(data["case_shape"], reverse=True)))  # some cases have permuted axes
    rows = [[r["tool"], str(r["cases"]), str(r["workers"]), f"{r['usage']['seconds']:.0f}", f"{r['per_case_s']:.2f}",
             f"{r['usage']['cpu_seconds'] / r['cases']:.2f}", f"{r['usage']['peak_mib']:.0f}"] for r in data["rows"]]
    ratios = [[name, *(f"{s[k]:.2f}" if k in s else "" for k in
                       ("per_case_time_ratio", "time_ratio", "cpu_ratio", "peak_memory_ratio"))]
              for name, s in data["summary"].items()]
    return (f"cases of {shape} voxels (image and label), {data['raw_mib_per_case']:.1f} MiB raw each\n\n"
            + _table(["tool", "cases", "workers", "wall s", "wall s per case", "CPU s per case", "peak MiB"], rows,
                     "lrrrrrr")
            + "\n\n" + _table(["ratio", "per-case time, largest / smallest", "wall time", "CPU time", "peak memory"],
                                ratios, "lrrrr"))


@renderer("predict_batch")
def predict_batch_table(data: dict[str, Any]) -> str:
    """benchmarks/predict_batch.py: scans per minute per worker count, and the --resume re-run."""
    first = data["rows"][0]
    rows = [[str(r["workers"]), f"{r['seconds']:.0f}", f"{r['scans_per_minute']:.1f}",
             f"x{r['scans_per_minute'] / first['scans_per_minute']:.2f}"] for r in data["rows"]]
    resume = data["resume"]
    shape = " x ".join(map(str, data["scan_shape"]))
    return (f"{data['scans']} scans of {shape} voxels\n\n"
            + _table(["Ray workers", "wall s", "scans per minute", f"x {first['workers']} worker(s)"], rows, "rrrr")
            + f"\n\nRe-run with `--resume` on {resume['workers']} workers: {resume['seconds']:.0f} s, "
              f"{len(resume['recomputed_outputs'])} output(s) recomputed.")


def render(args: str, base: Path = ROOT) -> str:
    """The body of one marked block: its caption and table, from `args` (`PATH table=NAME k=v ...`)."""
    path, *words = args.split()
    options = dict(word.split("=", 1) for word in words)
    name = options.pop("table", None)
    if name not in RENDERERS:
        raise ValueError(f"marker 'results: {args}': unknown table {name!r} (known: {', '.join(sorted(RENDERERS))})")
    data = read(base / path)
    return f"{caption(data['provenance'])}\n\n{RENDERERS[name](data, **options)}\n"


def rendered(text: str, base: Path = ROOT) -> str:
    """`text` with every marked block's body rendered afresh."""
    return BLOCK.sub(lambda m: m["open"] + "\n" + render(m["args"], base) + "\n" + m["close"], text)


def unmarked_figure_tables(text: str) -> list[int]:
    """Line numbers of markdown tables holding decimals outside result markers (and not preceded
    by the `<!-- no-figures -->` marker of a table of settings)."""
    inside, fence, exempt, found = False, False, False, []
    previous = ""
    in_table = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = not fence
        if line.startswith("<!-- results:"):
            inside = True
        elif line.startswith("<!-- /results -->"):
            inside = False
        is_row = line.startswith("|") and not fence
        if is_row and not in_table:
            exempt = previous.strip() == NO_FIGURES
            if not inside and not exempt and _has_figures(text.splitlines()[number - 1:]):
                found.append(number)
        in_table = is_row
        if line.strip():
            previous = line
    return found


def _has_figures(lines: list[str]) -> bool:
    """Whether the table starting at lines[0] has a decimal number in a cell."""
    for line in lines:
        if not line.startswith("|"):
            return False
        if DECIMAL.search(re.sub(r"`[^`]*`", "", line)):
            return True
    return False


def problems(readme: Path, base: Path = ROOT) -> list[str]:
    """One line per marked table of `readme` that differs from what its results file renders, and
    per table of figures without markers."""
    text = readme.read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        try:
            body = "\n" + render(match["args"], base) + "\n"
        except (ValueError, KeyError, TypeError) as error:
            found.append(f"{readme}:{line}: {error}")
            continue
        if match["body"] != body:
            found.append(f"{readme}:{line}: table differs from {match['args'].split()[0]} "
                         "(python -m benchmarks.tables rewrites it)")
    found += [f"{readme}:{n}: a table of figures without a results marker" for n in unmarked_figure_tables(text)]
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only report tables that differ from their results files")
    p.add_argument("readmes", nargs="*", type=Path, default=READMES)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        found = [line for readme in args.readmes for line in problems(readme)]
        for line in found:
            log.error("%s", line)
        sys.exit(1 if found else 0)
    for readme in args.readmes:
        text = readme.read_text()
        new = rendered(text)
        if new != text:
            readme.write_text(new)
            log.info("%s: tables rewritten", readme)


if __name__ == "__main__":
    main()
