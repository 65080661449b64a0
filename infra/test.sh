#!/usr/bin/env bash
# README command 2: install (if needed), then run the whole test suite, slow tests included.
# Tests start their own services (Prefect server, S3 API server, a single-node Slurm cluster,
# the judge's test endpoint) on free 127.0.0.1 ports, and stop them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# --llama-cpp: the export and served-evaluation tests load the GGUF files in llama.cpp (its first
# build takes minutes on 2 cores; pip's wheel cache keeps it for later runs)
./infra/install.sh --llama-cpp
# Debian packages for the Slurm and browser tests; in CI they are required, elsewhere those tests
# skip with the reason when the packages cannot be installed (no root, not Debian).
if ! ./infra/system-packages.sh; then
  [[ "${CI:-}" == "true" ]] && exit 1
  echo "test: Slurm/chromium not installed; their tests will be skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
