#!/usr/bin/env bash
# Submit `python -m pipeline.ingest ARGS...` to the Ray cluster (environment: see submit.sh), e.g.
#   cluster/jobs/ingest.sh --source /home/ray/data/Task04_Hippocampus --out s3://BUCKET/uniseg/stores
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" ingest "$@"
