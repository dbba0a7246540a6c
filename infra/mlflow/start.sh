#!/usr/bin/env bash
# The team MLflow tracking server with basic auth (users, passwords, per-experiment and
# per-model permissions), the one `tracking.uri: http://...` of a cluster points at. Everything
# comes from the environment (systemd: EnvironmentFile=/etc/knet/mlflow.env, see mlflow.service):
#
#   MLFLOW_BACKEND_STORE_URI      required. Runs and models, e.g. postgresql://mlflow@db:5432/mlflow
#                                 (the password from PGPASSWORD or ~/.pgpass, not in the URI)
#   MLFLOW_ARTIFACTS_DESTINATION  required. Where the server stores artifacts, e.g.
#                                 s3://<bucket>/mlflow (clients upload through the server,
#                                 so only the server needs storage credentials)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  required. The auth app's static CSRF key, the same on every
#                                 server instance: python -c 'import secrets; print(secrets.token_hex(32))'
#   MLFLOW_AUTH_ADMIN_PASSWORD    required on the first start only (MLflow creates the admin user
#                                 with it and refuses to start without it); ignored afterwards
#   MLFLOW_HOST                   default 127.0.0.1. 0.0.0.0 (or an address) only when you mean
#                                 it; put TLS in front, basic auth over plain http is readable
#   MLFLOW_PORT                   default 5000
#   MLFLOW_AUTH_CONFIG_PATH       default infra/mlflow/basic_auth.ini
#   MLFLOW_AUTH_DATABASE_URI      optional: the users/permissions database instead of the
#                                 config file's database_uri (a private copy of the file is used)
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers to accept beyond localhost and private IPs, e.g.
#                                 mlflow.example.com,mlflow.knet.svc:5000 (MLflow reads it)
#   MLFLOW_WORKERS                optional: uvicorn workers (MLflow's default: 4)
#   MLFLOW_BIN                    optional: the mlflow executable (default: mlflow on PATH)
#
# The server needs infra/mlflow/requirements.txt (mlflow[auth], the PostgreSQL driver, boto3).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

die() {
  echo "infra/mlflow/start.sh: $*" >&2
  exit 2
}
redact() {  # a URI as printable: no password of user:password@, no query string
  printf '%s' "${1%%\?*}" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#'
}

[ -n "${MLFLOW_BACKEND_STORE_URI:-}" ] || die "MLFLOW_BACKEND_STORE_URI is not set: the \
database of runs and models, e.g. postgresql://mlflow@db:5432/mlflow (sqlite:///path/mlflow.db \
on a single host). Refusing to start."
[ -n "${MLFLOW_ARTIFACTS_DESTINATION:-}" ] || die "MLFLOW_ARTIFACTS_DESTINATION is not set: \
where the server stores artifacts, e.g. s3://<bucket>/mlflow. Refusing to start."
[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] || die "MLFLOW_FLASK_SERVER_SECRET_KEY is not set: \
the basic-auth app's static CSRF key (the same on every instance), e.g. from \
python -c 'import secrets; print(secrets.token_hex(32))'. Refusing to start."

MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"
command -v "$MLFLOW_BIN" >/dev/null || die "$MLFLOW_BIN not found: install \
infra/mlflow/requirements.txt (pip install -c requirements/constraints.txt -r \
infra/mlflow/requirements.txt) or set MLFLOW_BIN"

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
case "$port" in '' | *[!0-9]*) die "MLFLOW_PORT must be a port number, not '$port'" ;; esac

# The job-execution runner (10 processes, ~1.8 GiB) serves MLflow's GenAI jobs, which knet
# does not use; off unless asked for. No usage telemetry from a team server.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"

auth_config="${MLFLOW_AUTH_CONFIG_PATH:-$HERE/basic_auth.ini}"
[ -r "$auth_config" ] || die "the auth config $auth_config is not readable"
run_dir=""
if [ -n "${MLFLOW_AUTH_DATABASE_URI:-}" ]; then
  # MLflow reads database_uri only from the config file, so the override goes into a private
  # copy (a folder only this user can read, written then renamed: never half a file).
  case "$MLFLOW_AUTH_DATABASE_URI" in *$'\n'*) die "MLFLOW_AUTH_DATABASE_URI has a newline" ;; esac
  grep -Eq '^[[:space:]]*database_uri[[:space:]]*=' "$auth_config" \
    || die "$auth_config has no database_uri line to override"
  umask 077
  run_dir="$(mktemp -d "${RUNTIME_DIRECTORY:-${TMPDIR:-/tmp}}/mlflow-auth.XXXXXX")"
  trap 'rm -rf "$run_dir"' EXIT
  # configparser interpolates %: a literal % in the URI (URL escapes) is written as %%.
  KNET_AUTH_DB_URI="${MLFLOW_AUTH_DATABASE_URI//%/%%}" awk '
    /^[[:space:]]*database_uri[[:space:]]*=/ { print "database_uri = " ENVIRON["KNET_AUTH_DB_URI"]; next }
    { print }' "$auth_config" >"$run_dir/basic_auth.ini.tmp"
  mv "$run_dir/basic_auth.ini.tmp" "$run_dir/basic_auth.ini"
  auth_config="$run_dir/basic_auth.ini"
fi
export MLFLOW_AUTH_CONFIG_PATH="$auth_config"

case "$host" in
  127.0.0.1 | localhost | ::1) scope="this machine only" ;;
  *) scope="the network: use TLS in front of it and set MLFLOW_SERVER_ALLOWED_HOSTS" ;;
esac
echo "infra/mlflow/start.sh: MLflow (basic auth) on http://$host:$port, reachable from $scope"
echo "  backend store:  $(redact "$MLFLOW_BACKEND_STORE_URI")"
echo "  artifacts:      $MLFLOW_ARTIFACTS_DESTINATION"
echo "  auth config:    $MLFLOW_AUTH_CONFIG_PATH"
if [ -n "${MLFLOW_AUTH_DATABASE_URI:-}" ]; then
  echo "  auth database:  $(redact "$MLFLOW_AUTH_DATABASE_URI")"
fi
if [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]; then
  echo "  MLFLOW_AUTH_ADMIN_PASSWORD is not set: fine once the admin user exists (a first start" \
    "refuses without it)"
fi

args=(server --app-name basic-auth
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --host "$host" --port "$port")
if [ -n "${MLFLOW_WORKERS:-}" ]; then
  args+=(--workers "$MLFLOW_WORKERS")
fi

if [ -z "$run_dir" ]; then
  exec "$MLFLOW_BIN" "${args[@]}"
fi
# With a private config copy this script stays the parent, so the copy is removed when the
# server ends. `mlflow server` forwards SIGTERM / SIGINT to its uvicorn workers.
"$MLFLOW_BIN" "${args[@]}" &
server=$!
stopping=0
trap 'stopping=1; kill -TERM "$server" 2>/dev/null || true' TERM INT
status=0
wait "$server" || status=$?
while kill -0 "$server" 2>/dev/null; do  # a trapped signal ends the first wait early
  status=0
  wait "$server" || status=$?
done
if [ "$stopping" = 1 ]; then
  status=0  # stopped on request
fi
exit "$status"
