#!/usr/bin/env bash
# `make servers`: start, on 127.0.0.1, an MLflow server (:5000), a Prefect server (:4200) with a
# process work pool and a worker, and a Ray head (:6379, dashboard :8265); deploy train-knet
# and ablate-knet. Every process runs in its own process group, recorded in .servers/*.pid;
# infra/local/stop.sh stops exactly those groups (never `ray stop`, which stops all of Ray).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="$ROOT/.venv/bin"
STATE="$ROOT/.servers"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
# The dashboard's Train tab lists runs and workers only with Ray Train's state actor on; the
# variable is read where trainers are built (the Prefect worker's flows, knet train / tune).
export RAY_TRAIN_ENABLE_STATE_TRACKING="${RAY_TRAIN_ENABLE_STATE_TRACKING:-1}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

mkdir -p "$STATE"
for pid in "$STATE"/*.pid; do
  if [ -e "$pid" ] && kill -0 "-$(cat "$pid")" 2>/dev/null; then
    echo "servers already running (infra/local/stop.sh first): $pid" >&2; exit 1
  fi
done

start() {  # name, command...: its own session, so its process group is its PID
  local name="$1"; shift
  setsid "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
}
wait_for() {  # url, what
  for _ in $(seq 1 120); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 1
  done
  echo "$2 did not answer at $1; see $STATE/*.log" >&2; exit 1
}

start mlflow "$BIN/mlflow" server --backend-store-uri "sqlite:///$ROOT/mlflow.db" \
  --artifacts-destination "$ROOT/mlartifacts" --host 127.0.0.1 --port "$MLFLOW_PORT"
start prefect "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
# Auth is off here, so nothing may listen beyond this machine: with this variable at 0 every
# listener of the head (GCS, raylet, object manager, dashboard agent, client server) binds to
# 127.0.0.1, as in the local instance knet train starts (knet/training/cluster.py).
start ray env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
  "$BIN/ray" start --head --block --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT"
wait_for "http://127.0.0.1:$MLFLOW_PORT/health" "MLflow"
wait_for "http://127.0.0.1:$PREFECT_PORT/api/health" "Prefect"
wait_for "http://127.0.0.1:$DASHBOARD_PORT" "the Ray dashboard"

export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
"$BIN/prefect" work-pool inspect knet-process >/dev/null 2>&1 \
  || "$BIN/prefect" work-pool create knet-process --type process >/dev/null
cd "$ROOT"
KNET_ROOT="$ROOT" KNET_RAY_ADDRESS="127.0.0.1:$RAY_PORT" \
  KNET_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT" \
  "$BIN/prefect" --no-prompt deploy --all --prefect-file "$ROOT/prefect.yaml" >"$STATE/deploy.log"
PATH="$BIN:$PATH" start worker "$BIN/prefect" worker start --pool knet-process --name knet-local

cat <<MSG
servers up (logs and pids in $STATE):
  MLflow      http://127.0.0.1:$MLFLOW_PORT
  Prefect     http://127.0.0.1:$PREFECT_PORT   (work pool knet-process, worker knet-local)
  Ray         127.0.0.1:$RAY_PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT
run a flow:
  export PREFECT_API_URL=$PREFECT_API_URL
  .venv/bin/prefect deployment run train-knet/train-knet --param epochs=3
  .venv/bin/prefect deployment run ablate-knet/ablate-knet
stop exactly these processes:
  infra/local/stop.sh
MSG
