"""Training loader per CPU core at the paper's patch: ours next to nnU-Net v2's own loader.

Run by hand, from the repository root (nnU-Net in its own venv, see benchmarks/ingest.py):

    python -m benchmarks.loader [--cases 6] [--scale 4] [--patches 64,192,192 128,128,128]
        [--batches 20] [--peers .venv-peers] [--out benchmarks/results/loader/results.json]

One synthetic CT task (Task01_SynthLiver: liver and tumour) is written with `--cases` cases at
`--scale` times its grid on every axis (4: 256 x 256 x 128 voxels, 0.375 x 0.375 x 1.25 mm) in
nnU-Net v2 layout, ingested by ours (`pipeline.ingest`) and by nnU-Net
(`nnUNetv2_plan_and_preprocess -c 3d_fullres`; every case trains). Both keep the source
spacing, so both sample patches from 128 x 256 x 256 volumes.

Per patch size, each tool makes `--batches` augmented training batches of 2 (after 3 untimed
ones) in one fresh process held to one thread: ours `BatchStream.make_batch` (foreground
oversampling, nnU-Net's spatial, intensity and mirror transforms); nnU-Net its trainer's own
`get_dataloaders()` with `nnUNet_n_proc_DA=0` (nnUNetDataLoader + its transforms in a
SingleThreadedAugmenter), its plan edited to the patch and batch 2, deep supervision off (ours
makes the deep-supervision targets on the training device, not in the loader). With
`--augment-on device` ours is also timed reading only the regions the spatial transform
reaches, the loader's share when the transforms run on the GPU.

Figures: samples/s on one core (= per core: the loaders scale by processes), CPU ms per sample,
ours / nnU-Net, and the cores one GPU needs to keep the paper preset's model step fed (its
samples/s from `benchmarks/train_step.py --gpu --model-only`, `--gpu-samples-per-s`).
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
from pathlib import Path
from typing import Any

from benchmarks import results
from benchmarks.ingest import DATASET_ID, write_dataset
from benchmarks.tables import loader_table
from pipeline.common.logs import setup_logging

log = logging.getLogger("benchmarks.loader")
ROOT = Path(__file__).resolve().parents[1]
TASK = "Task01_SynthLiver"
GPU_SAMPLES_PER_S = 18.6  # paper preset, batch 2, AMP, H200 (benchmarks/README.md, "On a GPU")
WARMUP = 3

# Both snippets print [samples/s, CPU ms per sample] of `count` batches of 2 after WARMUP.
_TIMED = """
import time
for _ in range(WARMUP):
    batch()
wall, cpu = time.perf_counter(), time.process_time()
for _ in range(count):
    batch()
samples = 2 * count
print(json.dumps([samples / (time.perf_counter() - wall), (time.process_time() - cpu) / samples * 1e3]))
""".replace("WARMUP", str(WARMUP))

_OURS = """
import json, sys
import torch
torch.set_num_threads(1)
from pipeline.common.store import TaskStore
from pipeline.train.augment import AUGMENTATIONS
from pipeline.train.data import BatchStream, TrainingCases
from pipeline.train.sampling import build_sampler
store_uri, count, patch, augment_on = sys.argv[1], int(sys.argv[2]), tuple(int(v) for v in sys.argv[3:6]), sys.argv[6]
store = TaskStore.open(store_uri)
sampler = build_sampler("balanced", [len(store.case_ids("train"))], batches=count + WARMUP, batch_size=2)
stream = BatchStream(sampler, [store_uri], [store.manifest.num_classes], patch, epochs=1,
                     **({"augment_on": augment_on} if augment_on != "loader" else {}))
cases, augmentation = [TrainingCases(store)], AUGMENTATIONS["nnunet"](patch)
schedule = iter(enumerate(sampler.schedule(0)))
def batch():
    index, tasks = next(schedule)
    stream.make_batch(cases, augmentation, 0, index, tasks)
""".replace("WARMUP", str(WARMUP)) + _TIMED

_NNUNET = """
import json, os, sys
os.environ["nnUNet_n_proc_DA"] = "0"
import torch
torch.set_num_threads(1)
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
folder, count = sys.argv[1], int(sys.argv[2])
plans = load_json(os.path.join(folder, "nnUNetPlans.json")) | {"continue_training": False}
trainer = nnUNetTrainer(plans, "3d_fullres", 0, load_json(os.path.join(folder, "dataset.json")), device=torch.device("cpu"))
trainer.enable_deep_supervision = False
trainer._set_batch_size_and_oversample()
loader, _ = trainer.get_dataloaders()
def batch():
    next(loader)
""" + _TIMED


def _run_json(python: Path | str, code: str, args: list[str], env: dict[str, str] | None = None) -> list[float]:
    done = subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or dict(os.environ), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{python} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ingest_ours(dataset: Path, work: Path) -> Path:
    out = work / "stores"
    subprocess.run([sys.executable, "-m", "pipeline.ingest", "--source", str(dataset), "--out", str(out)],
                   check=True, capture_output=True)
    return out / f"{dataset.name}.zarr"


def nnunet_env(dataset: Path, work: Path) -> dict[str, str]:
    return dict(os.environ, nnUNet_raw=str(dataset.parent), nnUNet_preprocessed=str(work / "nnunet"),
                nnUNet_results=str(work / "nnunet-results"), OMP_NUM_THREADS="1")


def preprocess_nnunet(peers: Path, dataset: Path, work: Path) -> Path:
    subprocess.run([str(peers / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres",
                    "-npfp", "2", "-np", "2"], env=nnunet_env(dataset, work), check=True, capture_output=True)
    folder = work / "nnunet" / dataset.name
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (dataset / "labelsTr").glob("*.nii.gz"))
    (folder / "splits_final.json").write_text(json.dumps([{"train": cases, "val": cases[:1]}]))
    return folder


def set_nnunet_patch(folder: Path, patch: tuple[int, int, int]) -> None:
    plans_file = folder / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"].update(patch_size=list(patch), batch_size=2)
    plans_file.write_text(json.dumps(plans, indent=2))


def measure(args: argparse.Namespace, store: Path, nnunet: Path | None, env: dict[str, str],
            patch: tuple[int, int, int]) -> dict[str, Any]:
    row: dict[str, Any] = {"patch": list(patch)}
    modes = ["loader", *(["device"] if args.augment_on_device else [])]
    for mode in modes:
        log.info("ours (augment_on %s), patch %s", mode, patch)
        row[f"ours_{mode}"] = _run_json(sys.executable, _OURS, [str(store), str(args.batches), *map(str, patch), mode])
    if nnunet is not None:
        log.info("nnU-Net v2, patch %s", patch)
        set_nnunet_patch(nnunet, patch)
        row["nnunet"] = _run_json(args.peers / "bin" / "python", _NNUNET, [str(nnunet), str(args.batches)], env)
        row["ours_over_nnunet"] = row["ours_loader"][0] / row["nnunet"][0]
    row["cores_per_gpu"] = {k: args.gpu_samples_per_s / v[0] for k, v in row.items() if isinstance(v, list) and k != "patch"}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--scale", type=float, default=4.0, help="grid refinement of the synthetic task (4: 256x256x128)")
    p.add_argument("--patches", nargs="+", default=["64,192,192", "128,128,128"], help="Z,Y,X patch sizes")
    p.add_argument("--batches", type=int, default=20, help="timed batches of 2 per tool and patch")
    p.add_argument("--peers", type=Path, default=ROOT / ".venv-peers", help="venv with nnunetv2")
    p.add_argument("--without-nnunet", action="store_true")
    p.add_argument("--augment-on-device", action="store_true",
                   help="also time ours reading only the regions (train.augment_on: device)")
    p.add_argument("--gpu-samples-per-s", type=float, default=GPU_SAMPLES_PER_S)
    p.add_argument("--work", type=Path, help="keep the data here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=results.RESULTS / "loader" / "results.json")
    args = p.parse_args()
    setup_logging()
    run = results.start()
    if not args.without_nnunet and not (args.peers / "bin" / "nnUNetv2_plan_and_preprocess").exists():
        raise SystemExit(f"{args.peers}: no nnunetv2 there; create it as benchmarks/ingest.py says, "
                         "or run with --without-nnunet")
    work = args.work or Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        dataset = write_dataset(work / "raw", TASK, args.cases, args.scale)
        store = ingest_ours(dataset, work)
        env = nnunet_env(dataset, work)
        nnunet = None if args.without_nnunet else preprocess_nnunet(args.peers, dataset, work)
        patches = [tuple(int(v) for v in s.split(",")) for s in args.patches]
        rows = [measure(args, store, nnunet, env, patch) for patch in patches]  # type: ignore[arg-type]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    values = {"gpu_samples_per_s": args.gpu_samples_per_s, "cases": args.cases, "scale": args.scale,
              "batches": args.batches, "rows": rows}
    results.write(args.out, run, values)
    print(loader_table(values))


if __name__ == "__main__":
    main()
