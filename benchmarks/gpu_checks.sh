#!/usr/bin/env bash
# Every GPU check in one run, for a machine with CUDA (README "GPU"): the `gpu` tests, the model
# step of the tiny preset (fp16) and of the paper preset in every step setting (fp32, fp16, bf16,
# bf16 + channels-last, + torch.compile: samples/s, memory, MFU, loss beside fp32's; the
# reference's epoch time and memory), the sliding window, the loader per core, and the whole job (store, Ray Train with
# CPU and GPU augmentation, predict). Results and logs go to $OUT (default gpu-results/).
#
# Usage, from the repository root:
#   bash benchmarks/gpu_checks.sh          the project's dependencies importable, or wheels
#                                          prepared by benchmarks/gpu_wheels.sh in .whl/ (or
#                                          staged in /tmp/wheel-stage): installed first
#   bash benchmarks/gpu_checks.sh stage    only copy the carried .whl/part* to /tmp/wheel-stage
#                                          (a machine without network, wheels in several calls)
set -uo pipefail
STAGE=/tmp/wheel-stage
SITE=/tmp/site
PYTHON=${PYTHON:-python3}

stage_wheels() {
    mkdir -p "$STAGE"
    [ -d .whl ] && find .whl -type f -exec cp {} "$STAGE/" \;
    echo "staged: $(ls "$STAGE" | wc -l) file(s), $(du -sh "$STAGE" | cut -f1)"
}

install_wheels() {
    stage_wheels
    for first in "$STAGE"/*.whl.part-00; do  # pieces of a wheel larger than one call
        [ -e "$first" ] || continue
        cat "${first%-00}"-* > "${first%.part-00}" && rm "${first%-00}"-*
    done
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$STAGE"/*.whl || return 1
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # Ray's workers inherit it
    export PATH="$SITE/bin:$PATH"
}

if [ "${1:-}" = stage ]; then
    stage_wheels
    exit 0
fi
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
if ! "$PYTHON" -c "import ray, mlflow, monai, zarr" 2>/dev/null; then
    install_wheels 2>&1 | tail -3 | tee "$OUT/install.log"
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    "$PYTHON" -c "import ray, mlflow, monai, zarr" || { echo "dependencies missing after installing wheels"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" || status=1
"$PYTHON" -m benchmarks.train_step --gpu --model-only --preset tiny --steps 30 --settings fp16 \
    --out "$OUT/train_step_tiny.json" 2>&1 | tee -a "$OUT/train_step.log" || status=1
"$PYTHON" -m benchmarks.train_step --gpu --model-only --preset uniseg-paper --steps 30 \
    --out "$OUT/train_step_uniseg-paper.json" 2>&1 | tee -a "$OUT/train_step.log" || status=1
"$PYTHON" -m benchmarks.inference --device cuda --implementations ours --paper-scan 128 320 320 \
    --tiny-scan 128 320 320 --threads 4 --json "$OUT/inference.json" 2>&1 | tee "$OUT/inference.log" || status=1
"$PYTHON" -m benchmarks.loader --without-nnunet --augment-on-device --batches 10 --patches 64,192,192 \
    --out "$OUT/loader.json" 2>&1 | tee "$OUT/loader.log" || status=1
"$PYTHON" -m benchmarks.gpu_job --out "$OUT/gpu_job.json" 2>&1 | tail -40 | tee "$OUT/gpu_job.log" || status=1
exit $status
