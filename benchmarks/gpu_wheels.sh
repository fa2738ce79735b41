#!/usr/bin/env bash
# Prepare, on a machine with pip and the package registry, the wheels that a GPU machine with
# PyTorch but no Ray and no network lacks, cut into parts that each fit one device call (64 MiB).
#
#   bash benchmarks/gpu_wheels.sh            # -> .whl/part1 ... .whl/partN (git-ignored)
#
# Versions: this project's venv (pip freeze), so the GPU machine runs what the tests ran here;
# torch, triton and the CUDA libraries are the GPU machine's own. Wheels for the GPU machine's
# Python (PY_VERSION, default 3.12) on x86-64 Linux. Packages already on its image
# (benchmarks/gpu_image_packages.txt) are left out. Each part is a folder of whole wheels, or of
# pieces of one wheel larger than a part (NAME.whl.part-aa, -ab, ...); benchmarks/gpu_checks.sh
# joins the pieces and installs everything with pip --no-index --no-deps.
#
# On the device, one call per part while the machine stays warm:
#   bash benchmarks/gpu_checks.sh stage      (carry .whl/partK; copies it to /tmp/wheel-stage)
# and with the last part carried: bash benchmarks/gpu_checks.sh (installs, then runs the checks).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
PIP=${PIP:-.venv/bin/pip}
OUT=${OUT:-.whl}
PART_MIB=${PART_MIB:-56}  # the checkout travels too (64 MiB a call in all)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PIP" freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-)' > "$work/constraints.txt"
platforms=()
for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
           manylinux_2_31 manylinux_2_34 manylinux_2_35; do
    platforms+=(--platform "${tag}_x86_64")
done
# monai needs torch: its own wheel without dependencies, everything else with theirs.
"$PIP" download --quiet --only-binary=:all: --python-version "$PY_VERSION" --implementation cp "${platforms[@]}" \
    -c "$work/constraints.txt" -d "$work/all" \
    "ray[default,train,tune]" "zarr>=3,<4" "dask[distributed]" mlflow nibabel numpy scipy pydantic pyyaml \
    safetensors fsspec s3fs matplotlib tqdm psutil optuna google-crc32c numcodecs 2>&1 | grep -v "^WARNING: Location" || true
"$PIP" download --quiet --no-deps --only-binary=:all: -c "$work/constraints.txt" -d "$work/all" monai \
    2>&1 | grep -v "^WARNING: Location" || true

ls "$work"/all/ray-*.whl "$work"/all/monai-*.whl > /dev/null || { echo "download failed (no ray or monai wheel)"; exit 1; }
rm -rf "$OUT" && mkdir -p "$OUT/pieces"
limit=$((PART_MIB * 1024 * 1024))
for wheel in "$work"/all/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
    grep -qx "$name" <(grep -v '^#' benchmarks/gpu_image_packages.txt) && continue
    if (( $(stat -c %s "$wheel") > limit )); then  # larger than a part: in pieces
        split -b "$limit" -d "$wheel" "$OUT/pieces/$(basename "$wheel").part-"
    else
        cp "$wheel" "$OUT/pieces/"
    fi
done
# first fit, largest first: the fewest parts, so the fewest device calls
"$(dirname "$PIP")/python" - "$OUT" "$limit" <<'PACK'
import pathlib, sys
out, limit = pathlib.Path(sys.argv[1]), int(sys.argv[2])
parts: list[int] = []
for f in sorted((out / "pieces").iterdir(), key=lambda f: -f.stat().st_size):
    size = f.stat().st_size
    k = next((i for i, used in enumerate(parts) if used + size <= limit), len(parts))
    parts += [0] * (k == len(parts))
    parts[k] += size
    (out / f"part{k + 1}").mkdir(exist_ok=True)
    f.rename(out / f"part{k + 1}" / f.name)
(out / "pieces").rmdir()
PACK
part=$(ls -d "$OUT"/part* | wc -l)
du -sh "$OUT"/part* | sed 's/^/  /'
echo "$part part(s) in $OUT: carry each in its own device call (benchmarks/gpu_checks.sh stage), the last with the checks"
