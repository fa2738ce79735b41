#!/usr/bin/env bash
# Submit `python -m pipeline.evaluate ARGS...` to the Ray cluster (environment: see submit.sh), e.g.
#   cluster/jobs/evaluate.sh --model models:/uniseg@champion --store s3://BUCKET/uniseg/stores/Task04_Hippocampus.zarr
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" evaluate "$@"
