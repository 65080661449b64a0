#!/usr/bin/env bash
# Create or update .venv/ at the repository root with everything the project needs (CPU machine).
# Idempotent: a second run with unchanged requirements finishes in about a second.
#   --llama-cpp   also build llama-cpp-python (llama.cpp's quantizer, loader and server: k-quants,
#                 GGUF checks, the served evaluation). Minutes of compiling on 2 cores the first time;
#                 pip's wheel cache keeps the build, so later installs take seconds.
set -euo pipefail
llama=0
[[ "${1:-}" == "--llama-cpp" ]] && llama=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
python="${PYTHON:-python3}"
stamp="$venv/.prolong-install"
want="$(cat infra/install.sh infra/constraints.txt infra/requirements.txt pyproject.toml | sha256sum | cut -c1-16)"

LLAMA_CPP_PYTHON=0.3.36  # its sdist carries llama.cpp: the converter is unpacked from it, the library built from it
llama_ready() { "$venv/bin/python" -c "import llama_cpp" >/dev/null 2>&1; }
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && { [[ $llama == 0 ]] || llama_ready; }; then
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
# DeepSpeed's CPU collectives op (deepspeed_shm_comm), compiled ahead of time. Left to DeepSpeed it is
# JIT-compiled by every job's first deepspeed.initialize (1-3 min on 2 cores) under a lock file in
# ~/.cache/torch_extensions; a job killed while holding that lock (a timeout, kill -9) leaves every
# later DeepSpeed job waiting on it forever. The wheel is built once and kept beside pip's cache.
ds_ready() { "$venv/bin/python" -c "from deepspeed.git_version_info import installed_ops as o; assert o.get('deepspeed_shm_comm')" >/dev/null 2>&1; }
if ! ds_ready; then
  ds_version="$(sed -n 's/^deepspeed==//p' infra/constraints.txt)"
  cache="$("$venv/bin/python" -m pip cache dir 2>/dev/null || echo "${XDG_CACHE_HOME:-$HOME/.cache}/prolong")"  # pip's cache may be off
  wheels="$cache/prolong-deepspeed-shm/$ds_version"
  if ! ls "$wheels"/deepspeed-"$ds_version"-*.whl >/dev/null 2>&1; then
    log "deepspeed $ds_version with its CPU collectives op compiled (minutes the first time; kept in $wheels)"
    mkdir -p "$wheels.part" && rm -f "$wheels.part"/*.whl
    DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu "${pip[@]}" wheel --no-deps --no-build-isolation --no-cache-dir \
      --no-binary deepspeed -w "$wheels.part" "deepspeed==$ds_version"
    rm -rf "$wheels" && mv "$wheels.part" "$wheels"  # whole or not at all: an interrupted build is redone
  fi
  "${pip[@]}" install --no-deps --force-reinstall "$wheels"/deepspeed-"$ds_version"-*.whl
  ds_ready || { echo "install: deepspeed's deepspeed_shm_comm op is not installed; see the errors above" >&2; exit 1; }
fi
log "project (editable)"
"${pip[@]}" install --no-deps -e .
# llama.cpp's GGUF converter (convert_hf_to_gguf.py, conversion/, the gguf-py it was released with), unpacked
# from the llama-cpp-python source distribution: a download, no build (the export stage's f16/bf16/q8_0 files)
share="$venv/share/llama.cpp"
if [[ ! -f "$share/.from-$LLAMA_CPP_PYTHON" ]]; then
  log "llama.cpp's converter (from llama-cpp-python $LLAMA_CPP_PYTHON's sdist)"
  sdist="$(mktemp -d)"
  "${pip[@]}" download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$sdist"
  tar -xzf "$sdist"/llama_cpp_python-*.tar.gz -C "$sdist" --wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' \
    '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*' '*/vendor/llama.cpp/LICENSE'
  rm -rf "$share" && mkdir -p "$(dirname "$share")"
  mv "$sdist"/llama_cpp_python-*/vendor/llama.cpp "$share"
  touch "$share/.from-$LLAMA_CPP_PYTHON"
  rm -rf "$sdist"
fi
"$venv/bin/python" -c 'import torch, transformers, prefect; from prolong.data.mds import import_streaming; import_streaming()' \
  || { echo "install: the environment does not import; see the errors above" >&2; exit 1; }
echo "$want" > "$stamp"
if [[ $llama == 1 ]] && ! llama_ready; then
  # the library only (no examples or tests), for every x86-64 CPU; the quantizer and the loader are in it
  log "llama-cpp-python $LLAMA_CPP_PYTHON (builds llama.cpp the first time: minutes; cached by pip afterwards)"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    "${pip[@]}" install -c infra/constraints.txt "llama-cpp-python[server]==$LLAMA_CPP_PYTHON"
  llama_ready || { echo "install: llama-cpp-python does not import; see the errors above" >&2; exit 1; }
fi
log "done: $venv"
