#!/usr/bin/env bash
# Stop the process groups that infra/local/servers.sh started (and nothing else).
set -uo pipefail
STATE="$(cd "$(dirname "$0")/../.." && pwd)/.servers"
for pid in "$STATE"/*.pid; do
  [ -e "$pid" ] || continue
  group="$(cat "$pid")"
  if kill -TERM "-$group" 2>/dev/null; then
    for _ in $(seq 1 30); do kill -0 "-$group" 2>/dev/null || break; sleep 1; done
    kill -KILL "-$group" 2>/dev/null || true
    echo "stopped $(basename "$pid" .pid) (process group $group)"
    if [ "$(basename "$pid")" = ray.pid ]; then
      rm -f /tmp/ray/ray_current_cluster  # `ray start` left it naming the head just stopped
    fi
  fi
  rm -f "$pid"
done
