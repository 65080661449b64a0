#!/usr/bin/env bash
# A local S3 API server (moto) on 127.0.0.1 for trying s3:// stores without a cloud account.
#   infra/s3-server.sh start|stop|env     (port: S3_PORT, default 9000; bucket: S3_BUCKET, default prolong)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${S3_PORT:-9000}"
bucket="${S3_BUCKET:-prolong}"
dir="$root/.cache/s3-server"
pidfile="$dir/server.pid"
endpoint="http://127.0.0.1:$port"

case "${1:-}" in
  start)
    mkdir -p "$dir"
    if ! curl -sf --max-time 2 "$endpoint" >/dev/null 2>&1; then
      "$root/.venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$dir/server.log" 2>&1 </dev/null &
      echo $! >"$pidfile"
      for _ in $(seq 1 30); do curl -sf --max-time 2 "$endpoint" >/dev/null 2>&1 && break; sleep 0.5; done
    fi
    AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test "$root/.venv/bin/python" - "$endpoint" "$bucket" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
if sys.argv[2] not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=sys.argv[2])
PY
    echo "s3 server: up at $endpoint, bucket s3://$bucket" >&2 ;;
  stop)
    [[ -f "$pidfile" ]] && { kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; }
    echo "s3 server: stopped" >&2 ;;
  env)
    echo "export S3_ENDPOINT_URL=$endpoint AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test"
    echo "# then: prolong run recipes/tiny.yaml --store s3://$bucket/runs" ;;
  *)
    echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
