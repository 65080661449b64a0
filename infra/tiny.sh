#!/usr/bin/env bash
# README command 1: install (if needed), start a local Prefect server, run the tiny recipe end to end.
# Extra arguments go to `prolong run` (e.g. --from-stage sft, --set stage1.steps=10, --store s3://...).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./infra/install.sh
./infra/prefect-server.sh start
export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT:-4200}/api"
echo "Prefect UI: http://127.0.0.1:${PREFECT_PORT:-4200}  (flow runs of 'prolong-recipe')" >&2
exec .venv/bin/prolong run recipes/tiny.yaml "$@"
