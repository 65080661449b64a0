"""``builtin:tiny-bpe`` (a byte-level BPE trained on the tiny corpus) and ``builtin:tiny-llama`` (a
randomly initialised Llama of a few M parameters with that tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from prolong.assets.stdlib_docs import stdlib_dir

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|pad|>"]
# Llama-3's chat format; `{% generation %}` marks assistant tokens for HF's assistant-mask support.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TINY_LLAMA = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=8192, rope_theta=500000.0)
TINY_VOCAB = 4096


def _tokenizer_training_text(corpus: Path) -> Iterator[str]:
    for name in ("books", "short", "chat"):
        with open(corpus / f"{name}.jsonl") as f:
            for line in f:
                row = json.loads(line)
                yield row["text"] if "text" in row else "\n".join(m["content"] for m in row["messages"])
    root = stdlib_dir()
    for path in sorted(root.glob("*.py"))[:200]:  # some code, so code tokenizes sensibly
        yield path.read_text(encoding="utf-8", errors="replace")


def build_tiny_bpe(out: Path, final: Path, deps: dict[str, Path]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = deps["tiny-corpus"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_training_text(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = TINY_LLAMA["max_position_embeddings"]
    fast.save_pretrained(out)


def build_tiny_llama(out: Path, final: Path, deps: dict[str, Path]) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(deps["tiny-bpe"])
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **TINY_LLAMA)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Written directly, not with save_pretrained: under an initialised process group that writes
    # weights on rank 0 only, and the rank building the asset may be any rank.
    from safetensors.torch import save_file

    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    tok.save_pretrained(out)
