#!/usr/bin/env bash
# Every GPU check in one run, for a machine with CUDA (README "GPU"): the `gpu` tests, the model
# step of the tiny preset (fp16, as measured before) and of the paper preset in every step setting
# (fp32, fp16, bf16, bf16 + channels-last, bf16 + channels-last + torch.compile: samples/s, memory,
# MFU, loss beside fp32's) beside the reference's epoch time and memory, and the sliding window
# (ours vs MONAI's) on the GPU. Results and logs go to $OUT (default gpu-results/).
# Usage: bash benchmarks/gpu_checks.sh   (from the repository root, the project installed)
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" || status=1
"$PYTHON" benchmarks/train_step.py --gpu --model-only --preset tiny --steps 30 --settings fp16 \
    --out "$OUT/train_step_tiny.json" 2>&1 | tee -a "$OUT/train_step.log" || status=1
"$PYTHON" benchmarks/train_step.py --gpu --model-only --preset uniseg-paper --steps 30 \
    --out "$OUT/train_step_uniseg-paper.json" 2>&1 | tee -a "$OUT/train_step.log" || status=1
"$PYTHON" benchmarks/inference.py --device cuda --implementations ours monai --paper-scan 128 320 320 \
    --tiny-scan 128 320 320 --threads 4 --json "$OUT/inference.json" 2>&1 | tee "$OUT/inference.log" || status=1
exit $status
