#!/usr/bin/env bash
# README command 2: install (if needed), then run the whole test suite, slow tests included.
# Tests start their own services (Prefect server, S3 API server) on free 127.0.0.1 ports.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./infra/install.sh
exec .venv/bin/python -m pytest "$@"
