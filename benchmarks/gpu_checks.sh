#!/usr/bin/env bash
# Every GPU check in one run, for a machine with CUDA (README "GPU"): the `gpu` tests, the model
# step of the tiny and paper presets beside the reference's epoch time and memory, and the
# sliding window (ours vs MONAI's) on the GPU. Results and logs go to $OUT (default gpu-results/).
# Usage: bash benchmarks/gpu_checks.sh   (from the repository root, the project installed)
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" || status=1
for preset in tiny uniseg-paper; do
    "$PYTHON" benchmarks/train_step.py --gpu --model-only --preset "$preset" --steps 30 \
        --out "$OUT/train_step_$preset.json" 2>&1 | tee -a "$OUT/train_step.log" || status=1
done
"$PYTHON" benchmarks/inference.py --device cuda --implementations ours --paper-scan 128 320 320 \
    --tiny-scan 128 320 320 --threads 4 --json "$OUT/inference.json" 2>&1 | tee "$OUT/inference.log" || status=1
exit $status
