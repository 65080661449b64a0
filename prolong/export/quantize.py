"""``python -m prolong.export.quantize SOURCE.gguf OUT.gguf TYPE``: llama.cpp's quantizer
(``llama_model_quantize``, through llama-cpp-python) from a 16/32-bit GGUF to a k-quant or other
llama.cpp type (``Q4_K_M``, ``Q6_K``, ...)."""

from __future__ import annotations

import ctypes
import sys


def main(argv: list[str]) -> int:
    source, out, qtype = argv
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        print(f"error: llama.cpp's quantizer has no type {qtype}", file=sys.stderr)
        return 2
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 0  # all cores
    rc = llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        print(f"error: llama_model_quantize returned {rc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
