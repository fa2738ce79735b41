#!/usr/bin/env bash
# Submit `python -m pipeline.train ARGS...` to the Ray cluster (environment: see submit.sh), e.g.
#   cluster/jobs/train.sh --config configs/uniseg-paper.yaml
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" train "$@"
