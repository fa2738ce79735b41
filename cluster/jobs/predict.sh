#!/usr/bin/env bash
# Submit `python -m pipeline.predict ARGS...` to the Ray cluster (environment: see submit.sh), e.g.
#   cluster/jobs/predict.sh --model models:/uniseg@champion --task TASK -i /home/ray/data/in -o /home/ray/data/out
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" predict "$@"
