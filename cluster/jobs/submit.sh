#!/usr/bin/env bash
# Submit one pipeline stage to a Ray cluster as a Ray job:
#
#   cluster/jobs/submit.sh STAGE [ARGS...]     STAGE: ingest | train | evaluate | predict | tune
#
# ARGS go to `python -m pipeline.STAGE` unchanged. The job's working directory is this
# repository (uploaded with cluster/runtime_env.yaml's excludes), so give paths relative to
# the repository root, or s3:// URIs. The per-stage scripts next to this one call it.
#
# Environment:
#   RAY_ADDRESS       the cluster's job API (default http://127.0.0.1:8265: `ray dashboard
#                     cluster/<yaml>` forwards it from the head)
#   RAY_AUTH_MODE     default token; the token is RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH,
#                     or ~/.ray/auth_token (the one the cluster YAML copied to the nodes)
#   RAY_JOB_OPTS      extra `ray job submit` options, e.g. "--no-wait --entrypoint-num-gpus 1"
set -euo pipefail

STAGES="ingest train evaluate predict tune"

usage() {
    echo "usage: $(basename "$0") STAGE [ARGS...]   (STAGE: ${STAGES// / | })" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
stage=$1
shift
[[ " $STAGES " == *" $stage "* ]] || { echo "unknown stage '$stage'" >&2; usage; }

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo_root"

address=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} ]]; then
    token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    if [[ ! -s $token_file ]]; then
        echo "no Ray auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the cluster's token" >&2
        echo "in $token_file (\`ray get-auth-token\` prints it on the machine that ran \`ray up\`)" >&2
        exit 2
    fi
fi

extra=()
if [[ -n ${RAY_JOB_OPTS:-} ]]; then
    read -r -a extra <<< "$RAY_JOB_OPTS"
fi

ray job submit \
    --address "$address" \
    --working-dir . \
    --runtime-env cluster/runtime_env.yaml \
    --metadata-json "{\"stage\": \"$stage\"}" \
    ${extra[@]+"${extra[@]}"} \
    -- python -m "pipeline.$stage" "$@"
