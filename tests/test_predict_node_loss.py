"""Batch prediction on the simulated three-node cluster (cluster/simulate.py) losing node-b
mid-batch: the scans its workers held run again on the other nodes, every scan ends predicted,
no output written before the loss is touched; a re-run with --resume recomputes nothing.

Each scan is the liver case tiled 2 x 2 x 2 and predicted with mirroring (seconds per scan, not
a tenth of one), so node-b's workers are still mid-scan when the first scan's outputs appear."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import ray

from cluster.simulate import simulated_cluster, wait_until
from pipeline.common.inference import InferenceOptions
from pipeline.predict.distributed import RayOptions
from pipeline.predict.run import PredictOptions, run
from test_predict_world import LIVER, World, world  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
SCANS = 8


def _outputs(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _large_scan(source: Path, path: Path) -> Path:
    image = nib.load(source)
    nib.save(nib.Nifti1Image(np.tile(np.asanyarray(image.dataobj), (2, 2, 2)), image.affine, image.header), path)
    return path


def test_batch_loses_a_node_and_completes_then_resumes(world: World, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    if ray.is_initialized():  # left by another module
        ray.shutdown()
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    scan = _large_scan(world.raw[LIVER.name] / "imagesTr" / "synthliver_000.nii.gz", tmp_path / "large.nii.gz")
    cases = [f"scan_{i:03d}" for i in range(SCANS)]
    for case in cases:
        (inputs / f"{case}.nii.gz").symlink_to(scan)
    options = PredictOptions(model=str(world.model_dir), task=LIVER.name, input=inputs, output=output,
                             inference=InferenceOptions(mirror_axes=(0, 1, 2)), ray=RayOptions(num_workers=4))
    failure: list[BaseException] = []

    def predict() -> None:
        try:
            run(options)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            failure.append(err)

    with simulated_cluster({}) as sim, caplog.at_level(logging.INFO):
        thread = threading.Thread(target=predict, name="batch")
        thread.start()
        wait_until(lambda: output.is_dir() and any(p.suffix == ".json" for p in output.iterdir()), 300,
                   "a finished scan", thread.is_alive)
        before = _outputs(output)
        sim.remove("node-b")  # two of the four workers, each mid-scan
        thread.join(600)
        assert not thread.is_alive() and not failure, failure
        after = _outputs(output)
        assert sorted(after) == sorted(f"{c}{e}" for c in cases for e in (".json", ".nii.gz"))
        assert {name: after[name] for name in before} == before  # finished outputs untouched
        assert "its Ray worker was lost" in caplog.text

        caplog.clear()
        run(PredictOptions(**{**options.__dict__, "resume": True}))
        assert _outputs(output) == after  # nothing recomputed
        assert f"{SCANS} of {SCANS} scan(s) already predicted" in caplog.text
