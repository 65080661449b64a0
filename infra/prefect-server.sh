#!/usr/bin/env bash
# A local Prefect server (SQLite) for this checkout: the UI at http://127.0.0.1:${PREFECT_PORT:-4200}.
#   infra/prefect-server.sh start|stop|status|env
# State lives in .prefect/ (PREFECT_HOME), so it never touches a user's own ~/.prefect.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${PREFECT_PORT:-4200}"
home="${PREFECT_SERVER_HOME:-$root/.prefect}"
pidfile="$home/server.pid"
url="http://127.0.0.1:$port/api"
export PREFECT_HOME="$home" PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_ENABLED=true
# the UI in the browser calls this API URL; its default assumes port 4200
export PREFECT_SERVER_UI_API_URL="$url"

healthy() { curl -sf --max-time 2 "$url/health" >/dev/null 2>&1; }

case "${1:-}" in
  start)
    mkdir -p "$home"
    if healthy; then echo "prefect server: already up at $url" >&2; exit 0; fi
    "$root/.venv/bin/prefect" server start --host 127.0.0.1 --port "$port" >"$home/server.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 1 90); do
      if healthy; then echo "prefect server: up at http://127.0.0.1:$port (log $home/server.log)" >&2; exit 0; fi
      kill -0 "$(cat "$pidfile")" 2>/dev/null || break
      sleep 1
    done
    echo "prefect server: did not start; see $home/server.log" >&2
    tail -20 "$home/server.log" >&2 || true
    exit 1 ;;
  stop)
    if [[ -f "$pidfile" ]]; then
      pid="$(cat "$pidfile")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
    echo "prefect server: stopped" >&2 ;;
  status)
    if healthy; then echo "up at $url"; else echo "down"; exit 1; fi ;;
  env)
    echo "export PREFECT_API_URL=$url" ;;
  *)
    echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
