#!/usr/bin/env bash
# Create or update .venv/ at the repository root with everything the project needs (CPU machine).
# Idempotent: a second run with unchanged requirements finishes in about a second.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
python="${PYTHON:-python3}"
stamp="$venv/.prolong-install"
want="$(cat infra/install.sh infra/constraints.txt infra/requirements.txt pyproject.toml | sha256sum | cut -c1-16)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

log() { printf '[install] %s\n' "$*" >&2; }
"$python" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || { echo "install: Python >= 3.10 is required (set PYTHON=...)" >&2; exit 1; }
[[ -x "$venv/bin/python" ]] || { log "creating $venv"; "$python" -m venv "$venv"; }
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
export PIP_NO_INPUT=1

# torch first and pinned: anything that pulls an unpinned torch would fetch the CUDA build.
log "torch (CPU build)"
"${pip[@]}" install -c infra/constraints.txt torch
log "project requirements"
"${pip[@]}" install -c infra/constraints.txt -r infra/requirements.txt
# streaming's declared pins (transformers<5, torchvision, old s3fs) fight the rest; its real deps are above.
log "mosaicml-streaming (no deps)"
"${pip[@]}" install -c infra/constraints.txt --no-deps mosaicml-streaming
# A PyPI torchvision cannot load against CPU torch and breaks transformers imports.
if "$venv/bin/python" -m pip show -q torchvision >/dev/null 2>&1; then
  "${pip[@]}" uninstall -y torchvision
fi
log "project (editable)"
"${pip[@]}" install --no-deps -e .
"$venv/bin/python" -c 'import torch, transformers, prefect; from prolong.data.mds import import_streaming; import_streaming()' \
  || { echo "install: the environment does not import; see the errors above" >&2; exit 1; }
echo "$want" > "$stamp"
log "done: $venv"
