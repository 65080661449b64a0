"""``python -m prolong.export.convert LLAMA_CPP_DIR PRE_TOKENIZER MODEL_DIR [converter args]``:
llama.cpp's ``convert_hf_to_gguf.py``, run as it is, with one addition: a BPE tokenizer whose hash
the converter does not know (any tokenizer trained for a new model, the tiny one included) gets
the pre-tokenizer ``PRE_TOKENIZER`` names — llama.cpp's own mechanism is to register the hash in
the converter; this passes the same name without editing it. ``auto``: a tokenizer whose
``tokenizer.json`` pre-tokenizer is plain GPT-2 byte-level is ``gpt-2``; anything else unknown stays
the converter's error."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


# the pre-tokenizer split of Llama 3's tokenizer.json
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_name(model_dir: Path) -> str | None:
    """llama.cpp's name for the pre-tokenizer of ``tokenizer.json``, when it is one of the two
    standard byte-level ones."""
    try:
        pre = json.loads((model_dir / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    return None


def main(argv: list[str]) -> None:
    root, pre_tokenizer, model_dir, *rest = argv
    sys.path.insert(0, root)
    sys.path.insert(1, str(Path(root) / "gguf-py"))
    from conversion import base

    known = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            name = pre_tokenizer
            if name == "auto":
                name = pre_tokenizer_name(Path(model_dir))
                if name is None:
                    raise
            base.logger.warning("BPE pre-tokenizer not known to the converter by its hash: using %r", name)
            return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(Path(root) / "convert_hf_to_gguf.py"), model_dir, *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
