#!/usr/bin/env bash
# MLflow tracking server for a team: runs, params, metrics and the model registry in
# PostgreSQL; artifacts (plots, checkpoints, registered models) in S3, proxied by the server,
# so clients need no S3 credentials. See docs/cluster.md, "MLflow tracking server".
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db.internal:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://BUCKET/uniseg/mlflow \
#   cluster/mlflow/mlflow-server.sh [--open] [--auth] [--port N]
#
#   --open     listen on all interfaces (MLFLOW_OPEN=1 does the same); default 127.0.0.1, local
#              only. Open it only on a private network (security group, firewall) or behind a
#              TLS proxy: MLflow's own checks (allowed Host headers, CORS) are not access control.
#   --auth     MLflow's basic-auth app: users and permissions in $MLFLOW_STATE_DIR/basic_auth.db;
#              the first start needs MLFLOW_AUTH_ADMIN_PASSWORD (user "admin"). Clients then set
#              MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
#   --port N   default 5000 (MLFLOW_PORT)
#
# Other environment: MLFLOW_STATE_DIR (default ~/.mlflow-server), MLFLOW_WORKERS (default 4),
# MLFLOW_ALLOWED_HOSTS (e.g. "mlflow.internal,10.0.*"; default: localhost and private IPs).
# S3 credentials come from the host's IAM instance profile or the usual AWS_* variables;
# an S3-compatible store (MinIO) needs MLFLOW_S3_ENDPOINT_URL as well.
# Needs: pip install "mlflow[auth]" psycopg2-binary boto3   (the auth extra for --auth only)
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
}

host=127.0.0.1
[[ ${MLFLOW_OPEN:-0} == 1 ]] && host=0.0.0.0
port=${MLFLOW_PORT:-5000}
auth=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --open) host=0.0.0.0 ;;
        --auth) auth=1 ;;
        --port) [[ $# -ge 2 ]] || usage; port=$2; shift ;;
        -h|--help) usage ;;
        *) echo "unknown option: $1" >&2; usage ;;
    esac
    shift
done

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow:PASSWORD@db.internal:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://BUCKET/uniseg/mlflow}"

state_dir=${MLFLOW_STATE_DIR:-$HOME/.mlflow-server}
mkdir -p "$state_dir"
chmod 700 "$state_dir"

# mlflow reads both from the environment: the database password stays out of `ps`.
export MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION
args=(
    --serve-artifacts
    --host "$host"
    --port "$port"
    --workers "${MLFLOW_WORKERS:-4}"
)
[[ -n ${MLFLOW_ALLOWED_HOSTS:-} ]] && args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")

if [[ $auth == 1 ]]; then
    auth_config=$state_dir/basic_auth.ini
    if [[ ! -f $auth_config ]]; then
        cat > "$auth_config" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$state_dir/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    fi
    export MLFLOW_AUTH_CONFIG_PATH=$auth_config
    args+=(--app-name basic-auth)
elif [[ $host != 127.0.0.1 ]]; then
    echo "warning: MLflow listens on $host:$port without --auth; anyone who reaches the port can" >&2
    echo "read and change runs and models. Keep the port inside a private network." >&2
fi

echo "mlflow server on $host:$port (backend ${MLFLOW_BACKEND_STORE_URI%%://*}, artifacts $MLFLOW_ARTIFACTS_DESTINATION)" >&2
exec mlflow server "${args[@]}"
