"""Batch prediction as a Ray job: `ray job submit -- python -m pipeline.predict ... --num-workers 2`,
on a Ray head started for this test only (tests/ray_head.py)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.common.metrics import dice
from ray_head import ray_head
from test_predict_world import LIVER, World, world  # noqa: F401 (fixture)


@pytest.mark.slow
def test_batch_of_scans_as_a_ray_job(world: World, tmp_path: Path) -> None:
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    cases = [f"synthliver_{i:03d}" for i in range(5)]
    for case in cases:
        (inputs / f"{case}.nii.gz").symlink_to(world.raw[LIVER.name] / "imagesTr" / f"{case}.nii.gz")
    entrypoint = ["python", "-m", "pipeline.predict", "--model", world.model_uri, "--tracking-uri", world.tracking_uri,
                  "--task", LIVER.name, "-i", str(inputs), "-o", str(output), "--tta", "off", "--num-workers", "2"]
    with ray_head() as head:
        job = head.submit(entrypoint, cwd=tmp_path, working_dir=False)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "on 2 Ray worker(s)" in job.stdout + job.stderr
    assert sorted(p.name for p in output.iterdir()) == sorted(f"{c}{e}" for c in cases for e in (".json", ".nii.gz"))
    for case in cases:
        image = nib.load(inputs / f"{case}.nii.gz")
        labels = nib.load(output / f"{case}.nii.gz")
        assert labels.shape == image.shape and np.allclose(labels.affine, image.affine)
        truth = nib.load(world.raw[LIVER.name] / "labelsTr" / f"{case}.nii.gz")
        assert dice(np.asarray(labels.dataobj), np.asarray(truth.dataobj), 1) > 0.7
