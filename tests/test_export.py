"""The export stage's files, checked by the clients that load them: llama.cpp (llama-cpp-python) and
transformers' GGUF loader against the HF model, on a tiny Llama that really learned some texts; the
served evaluation against the HF one; bad input before a job starts."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from prolong.errors import StageError
from prolong.eval.prompts import GenerationFailed, HFGenerator, prompt_token_ids
from prolong.export.llama_cpp import converter_dir, read_metadata
from prolong.export.main import check_gguf, write_gguf, write_hf
from prolong.model.rope import portable_config, set_rope_theta

THETA = 8e6  # stage 1's θ: not Llama's 5e5 nor the 1e4 a reader falls back to
CONTEXT = 512
TYPES = ["f16", "bf16", "q8_0", "Q4_K_M"]
# the largest |logit(llama.cpp) - logit(HF)| allowed per GGUF type, on logits spanning ~30 units;
# what this model measured (CPU, llama-cpp-python 0.3.36) is in the README's table
LOGIT_TOLERANCE = {"f16": 0.02, "bf16": 0.25, "q8_0": 0.25, "Q4_K_M": 1.5}
TEXTS = ["The quick brown fox jumps over the lazy dog while the farmer sleeps under the old oak tree.",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
         "Paris is the capital of France, Berlin is the capital of Germany and Rome is the capital of Italy.",
         "import numpy as np\nx = np.arange(10)\nprint(x.sum(), x.mean(), x.std())\n",
         "Once upon a time there was a little robot who wanted to learn how to paint the sunset over the sea."]
GREEDY_TOKENS = 16

pytestmark = pytest.mark.skipif(converter_dir() is None, reason="llama.cpp's converter is not installed")


def _llama(path: Path, **kw):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=CONTEXT, verbose=False, seed=0, **kw)


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama at θ = 8e6 trained until it reproduces TEXTS: its greedy continuations are
    decided by wide margins, so two correct runtimes agree on them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    set_rope_theta(model.config, THETA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    rows = [prompt_token_ids(tok, t) for t in TEXTS]  # BOS first, as every prompt has it
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])
    labels = ids.clone()
    labels[:, 1] = -100  # which text follows BOS is anyone's guess
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 3e-3:
            break
    assert loss.item() < 3e-3, loss.item()
    out = tmp_path_factory.mktemp("learned")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompts(learned) -> list[str]:
    """The first tokens of each text, as text: prompts the model knows how to continue."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(learned)
    out = [tok.decode(prompt_token_ids(tok, t)[1:7]) for t in TEXTS]
    assert [prompt_token_ids(tok, p) for p in out] == [prompt_token_ids(tok, t)[:7] for t in TEXTS]
    return out


@pytest.fixture(scope="module")
def exported(learned, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    write_hf(learned, out / "hf", "float16", "2MB", CONTEXT)
    write_gguf(out / "hf", out / "gguf", "learned", TYPES, "auto", out / "export.log")
    return out


def _hf_reference(hf: Path):
    """The exported (float16) weights through transformers, computed in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(hf))


@torch.no_grad()
def _greedy(model, ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
                         do_sample=False, num_beams=1)
    return out[0, len(ids):].tolist()


def test_exported_config_carries_theta_for_every_reader_and_the_weights_are_sharded(exported, learned):
    config = json.loads((exported / "hf" / "config.json").read_text())
    assert config["rope_theta"] == THETA and config["rope_parameters"]["rope_theta"] == THETA
    assert config["torch_dtype"] == config["dtype"] == "float16" and "rope_scaling" not in config
    assert config["max_position_embeddings"] == CONTEXT and config["architectures"] == ["LlamaForCausalLM"]
    index = json.loads((exported / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted((exported / "hf").glob("model-*.safetensors"))
    assert len(shards) >= 2 and {p.name for p in shards} == set(index["weight_map"].values())

    from safetensors.torch import load_file
    from transformers import AutoConfig

    source = load_file(str(learned / "model.safetensors"))
    written = {k: v for p in shards for k, v in load_file(str(p)).items()}
    assert written.keys() == source.keys()
    assert all(written[k].dtype == torch.float16 and torch.equal(written[k], source[k].half()) for k in source)
    assert AutoConfig.from_pretrained(exported / "hf").rope_parameters["rope_theta"] == THETA
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (exported / "hf" / name).is_file()


def test_rope_scaling_is_written_in_both_forms_and_reaches_the_gguf(learned, tmp_path):
    scaled = portable_config({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}})
    assert scaled["rope_theta"] == 1e4 and scaled["rope_scaling"] == {"rope_type": "linear", "factor": 4.0,
                                                                       "type": "linear"}
    model = tmp_path / "scaled"
    shutil.copytree(learned, model)
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": THETA}
    (model / "config.json").write_text(json.dumps(portable_config(config)))
    (path,) = write_gguf(model, tmp_path / "gguf", "scaled", ["f16"], "auto", tmp_path / "log").values()
    from prolong.export.llama_cpp import gguf_module

    fields = gguf_module().GGUFReader(str(path)).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 4.0
    assert fields["llama.rope.freq_base"].contents() == THETA


def test_gguf_files_read_back_with_the_stage_theta_context_and_vocabulary(exported):
    vocab = json.loads((exported / "hf" / "config.json").read_text())["vocab_size"]
    for t in TYPES:
        path = exported / "gguf" / f"learned.{t}.gguf"
        meta = check_gguf(path, THETA, CONTEXT, vocab)
        assert meta["file_type"] == t.upper() and meta["pre_tokenizer"] == "gpt-2", meta
        # and as llama.cpp itself reads the file
        llm = _llama(path, vocab_only=True)
        assert float(llm.metadata["llama.rope.freq_base"]) == THETA
        assert int(llm.metadata["llama.context_length"]) == CONTEXT and llm.n_vocab() == vocab
    with pytest.raises(StageError, match=r"learned.f16.gguf: .*RoPE θ 8e\+06 \(trained with 1\.28e\+08\)"):
        check_gguf(exported / "gguf" / "learned.f16.gguf", 1.28e8, CONTEXT, vocab)
    with pytest.raises(StageError, match=r"vocabulary of 4096 tokens \(the model has 4100\)"):
        check_gguf(exported / "gguf" / "learned.f16.gguf", THETA, CONTEXT, 4100)


def test_llama_cpp_generates_what_hf_generates_and_logits_agree_per_type(exported, prompts, capsys):
    import numpy as np

    model, tok = _hf_reference(exported / "hf")
    measured = {}
    for t in TYPES:
        llm = _llama(exported / "gguf" / f"learned.{t}.gguf", logits_all=True)
        worst = 0.0
        for prompt in prompts:
            ids = prompt_token_ids(tok, prompt)
            assert ids[0] == tok.bos_token_id and llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids[1:]
            want = _greedy(model, ids)
            got = []
            for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                got.append(token)
                if len(got) == GREEDY_TOKENS:
                    break
            if t in ("f16", "bf16"):
                assert got == want, (t, prompt, tok.decode(got), tok.decode(want))
            with torch.no_grad():
                ref = model(torch.tensor([ids + want])).logits[0].numpy()
            llm.reset()
            llm.eval(ids + want)
            worst = max(worst, float(np.abs(np.asarray(llm.scores[: len(ids + want)]) - ref).max()))
        measured[t] = worst
        llm.close()
    with capsys.disabled():
        print(f"\nmax |logit(llama.cpp) - logit(HF)|: {json.dumps({t: round(v, 4) for t, v in measured.items()})}")
    assert all(measured[t] <= LOGIT_TOLERANCE[t] for t in TYPES), measured


def test_transformers_gguf_loader_reads_the_files_back_to_the_same_model(exported, prompts):
    from transformers import AutoModelForCausalLM

    model, tok = _hf_reference(exported / "hf")
    for t in ("f16", "bf16", "q8_0"):
        loaded = AutoModelForCausalLM.from_pretrained(exported / "gguf", gguf_file=f"learned.{t}.gguf",
                                                      dtype=torch.float32).eval()
        assert loaded.config.rope_parameters["rope_theta"] == THETA
        for prompt in prompts:
            ids = prompt_token_ids(tok, prompt)
            if t != "q8_0":
                assert _greedy(loaded, ids) == _greedy(model, ids), (t, prompt)
            with torch.no_grad():
                x = torch.tensor([ids])
                assert (loaded(x).logits - model(x).logits).abs().max() <= LOGIT_TOLERANCE[t]


def _llama3_style_model(root: Path, tiny_model_dir: str) -> Path:
    """A BPE tokenizer with Llama 3's pre-tokenizer (split regex, then byte-level) and a model for it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from prolong.export.convert import LLAMA3_SPLIT

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    from prolong import assets

    corpus = [json.loads(line)["text"] for line in open(Path(assets.resolve("builtin:tiny-corpus")) / "books.jsonl")]
    tok.train_from_iterator(corpus * 2 + TEXTS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    out = root / "llama3-style"
    fast.save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(fast))
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 0, 1, None
    model.save_pretrained(out)
    return out


def test_a_llama3_style_tokenizer_exports_and_llama_cpp_tokenizes_like_hf(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    model = _llama3_style_model(tmp_path, tiny_model_dir)
    (path,) = write_gguf(model, tmp_path / "gguf", "l3", ["f16"], "auto", tmp_path / "log").values()
    assert read_metadata(path)["pre_tokenizer"] == "llama-bpe"
    tok, llm = AutoTokenizer.from_pretrained(model), _llama(path, vocab_only=True)
    # digits in threes, contractions and runs of spaces are where GPT-2's and Llama 3's splits differ
    for text in ["It's 1234567 o'clock,   they'll   say", "x = 10000 + 2025\n\n\tdone", *TEXTS]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False).input_ids


def test_a_tokenizer_llama_cpp_does_not_know_is_a_one_line_error(tmp_path, learned):
    model = tmp_path / "odd"
    shutil.copytree(learned, model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(StageError) as e:
        write_gguf(model, tmp_path / "gguf", "odd", ["f16"], "auto", tmp_path / "log")
    assert "llama.cpp's converter (f16) failed (exit 1)" in str(e.value) and "\n" not in str(e.value)


def test_a_served_gguf_generates_what_hf_generates_and_a_dead_server_fails_items(exported, prompts, tmp_path):
    from prolong.eval.serving import ServedGenerator, llama_cpp_server
    from prolong.eval.short_tasks import _check_prompt_scoring

    model, tok = _hf_reference(exported / "hf")
    local = HFGenerator(model, tok, "cpu")
    gguf = exported / "gguf" / "learned.f16.gguf"
    server = llama_cpp_server(gguf, CONTEXT, [], tmp_path / "serve.log", 120)
    with server as url:
        served = ServedGenerator(url, tok, server_adds_bos=bool(read_metadata(gguf)["add_bos"]), server=server,
                                 timeout_s=60)
        for prompt in prompts:
            assert served(prompt, GREEDY_TOKENS) == local(prompt, GREEDY_TOKENS)
            assert served(prompt, GREEDY_TOKENS, stop_at_newline=True) == local(prompt, GREEDY_TOKENS,
                                                                               stop_at_newline=True)
        # lm-eval's local-completions needs the added token's log-probability, which this server leaves out
        with pytest.raises(StageError, match=r"^eval.lm_eval: .* echoes the prompt without the log-probability"):
            _check_prompt_scoring(served, "eval")
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        for _ in range(2):  # the first failure finds it dead; later ones are not sent at all
            with pytest.raises(GenerationFailed, match=r"the llama_cpp server exited \(exit -9\) \[log: logs/serve.log"):
                served(prompts[0], 4)
    assert "POST /v1/completions" in (tmp_path / "serve.log").read_text()
