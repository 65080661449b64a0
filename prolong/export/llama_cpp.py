"""llama.cpp's own tools, as the export and the served evaluation use them.

* The converter, ``convert_hf_to_gguf.py`` (with its ``conversion/`` package and the ``gguf-py`` it
  was released with), from the llama-cpp-python source distribution: ``infra/install.sh`` unpacks
  it into ``{venv}/share/llama.cpp`` (a download, no build); ``LLAMA_CPP_DIR`` points elsewhere.
* The quantizer (k-quants) and the server: llama-cpp-python, built from that same source
  (``infra/install.sh --llama-cpp``).

Each runs in a process of its own (``python -m prolong.export.convert|quantize``, ``python -m
llama_cpp.server``): a crash of llama.cpp is a failed command with its log, not a dead job. This
module itself is torch-free, so the orchestrator can check the tools are there before a run.
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from pathlib import Path

from prolong.errors import StageError

CONVERTER = "convert_hf_to_gguf.py"


def converter_dir() -> Path | None:
    """Where llama.cpp's converter is (``LLAMA_CPP_DIR`` if set, else the venv's copy), or None."""
    chosen = os.environ.get("LLAMA_CPP_DIR")
    candidate = Path(chosen) if chosen else Path(sys.prefix) / "share" / "llama.cpp"
    return candidate if (candidate / CONVERTER).is_file() else None


def missing_converter() -> str:
    """Why :func:`converter_dir` found nothing, as the end of a one-line error."""
    chosen = os.environ.get("LLAMA_CPP_DIR")
    if chosen:
        return f"LLAMA_CPP_DIR={chosen} holds no {CONVERTER}"
    return "it is not installed (infra/install.sh unpacks it; or set LLAMA_CPP_DIR to a llama.cpp checkout)"


@functools.lru_cache(maxsize=4)
def converter_architectures(root: Path) -> frozenset[str]:
    """The HF architectures llama.cpp's converter converts: the names its model classes register
    with ``@ModelBase.register(...)``, read from its sources (importing them would import torch)."""
    names: set[str] = set()
    for path in sorted((root / "conversion").glob("*.py")) + [root / CONVERTER]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ModelBase"):
                names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return frozenset(names)


def library_problem(module: str = "llama_cpp") -> str | None:
    """None when llama-cpp-python's ``module`` loads (``llama_cpp``: the quantizer and loader;
    ``llama_cpp.server.app``: the server); else why not. Tried in a process of its own: loading
    libllama is the tool's business, not the orchestrator's."""
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=120)
    if probe.returncode == 0:
        return None
    lines = [ln for ln in probe.stderr.splitlines() if ln.strip()] or [f"exit {probe.returncode}"]
    return lines[-1].strip()


def gguf_module():
    """The ``gguf`` package released with the converter (its reader and constants)."""
    root = converter_dir()
    if root is not None and str(root / "gguf-py") not in sys.path:
        sys.path.insert(0, str(root / "gguf-py"))
    import gguf

    return gguf


def _run(what: str, args: list[str], log: Path, timeout_s: float) -> None:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(args)}\n".encode())
        out.flush()
        proc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout_s)
    if proc.returncode != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] or ["no output"]
        # the job's own log keeps the tool's last words; the folder the log is in is temporary
        sys.stderr.write("".join(f"  | {ln}\n" for ln in lines[-30:]))
        raise StageError(f"{what} failed (exit {proc.returncode}): {lines[-1].strip()}")


def convert(model_dir: Path, out: Path, outtype: str, *, pre_tokenizer: str, log: Path,
            timeout_s: float = 3600) -> None:
    """HF folder → GGUF of ``outtype`` (f32/f16/bf16/q8_0), by llama.cpp's converter."""
    root = converter_dir()
    if root is None:
        raise StageError(f"llama.cpp's converter: {missing_converter()}")
    _run(f"llama.cpp's converter ({outtype})",
         [sys.executable, "-m", "prolong.export.convert", str(root), pre_tokenizer, str(model_dir),
          "--outfile", str(out), "--outtype", outtype], log, timeout_s)


def quantize(source: Path, out: Path, qtype: str, *, log: Path, timeout_s: float = 3600) -> None:
    """A 16/32-bit GGUF → ``qtype`` (Q4_K_M, ...), by llama.cpp's quantizer."""
    _run(f"llama.cpp's quantizer ({qtype})", [sys.executable, "-m", "prolong.export.quantize", str(source), str(out),
                                               qtype], log, timeout_s)


def read_metadata(path: Path) -> dict:
    """The keys a deployment depends on, read back from a GGUF file by gguf's own reader."""
    gguf = gguf_module()
    reader = gguf.GGUFReader(str(path))

    def value(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    file_type = value("general.file_type")
    try:  # llama.cpp's name of it: MOSTLY_Q8_0 -> Q8_0
        file_type = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        pass
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {"architecture": arch, "rope_theta": value(f"{arch}.rope.freq_base"),
            "context_length": value(f"{arch}.context_length"), "file_type": file_type,
            "vocab_size": len(tokens.data) if tokens is not None else None,
            "pre_tokenizer": value("tokenizer.ggml.pre"), "add_bos": value("tokenizer.ggml.add_bos_token"),
            "tensors": len(reader.tensors)}
