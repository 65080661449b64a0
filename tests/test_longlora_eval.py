"""Evaluation as LongLoRA reports it (issue 17, point 7): passkey retrieval as its
passkey_retrivial.py builds and scores it, perplexity with a sliding window as its eval.py
computes it, and the table of perplexity by evaluation length (its Table 1).

The expected strings and numbers are written here from LongLoRA's code as read (dvlab-research/LongLoRA
at d4eb344: passkey_retrivial.py, eval.py), not imported from it; the test runs the real eval job on
the tiny model."""

import json
import shutil

import numpy as np
import pytest
import torch

from prolong import assets
from prolong.errors import ConfigError
from prolong.eval import report
from prolong.eval.backends import longlora_context
from prolong.eval.likelihood import sliding_window_perplexity, token_stream
from prolong.eval.main import run_eval_stage
from prolong.eval.synthetic import passkey
from prolong.manifest import read_manifest_at
from prolong.recipe import read_recipe_file, recipe_from_dict, recipe_to_dict
from prolong.store import Store
from tests.conftest import ROOT

# passkey_retrivial.py, generate_prompt_landmark (lines 50, 51, 52, 57, 58) and its prompt, lines 59-67
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
# line 52: " ".join([garbage] * 5000) → 5000 × 89 characters + 4999 spaces
FILLER_CHARS = 449_999
# LongLoRA's own generate_prompt_landmark(3840, seed) for seeds 0..9, run once from a scratch copy
# of passkey_retrivial.py (only its llama_attn_replace import removed): the keys it returned
SCRIPT_KEYS_3840 = ["43568", "33004", "35344", "1689", "8367", "18639", "41188", "49690", "25941", "20829"]


def script_prompt(n_garbage: int, seed: int) -> tuple[str, str]:
    """The script's steps, re-typed: its ``random`` is ``numpy.random`` (line 22), seeded per prompt."""
    state = np.random.get_state()
    np.random.seed(seed)
    prefix = np.random.randint(0, n_garbage)  # line 47
    key = np.random.randint(1, 50000)  # line 56: numpy's high is exclusive
    np.random.set_state(state)
    garbage_inf = " ".join([GARBAGE] * 5000)
    info = f"The pass key is {key}. Remember it. {key} is the pass key."  # line 57
    return "\n".join([TASK, garbage_inf[:prefix], info, garbage_inf[:n_garbage - prefix], QUESTION]), str(key)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Forward passes of a few hundred tokens: one thread is 20× faster than two on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(prolong_home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve("builtin:tiny-llama")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def books(n: int) -> list[str]:
    """PG19-style rows: one long text each, different words so windows differ."""
    rng = np.random.default_rng(n)
    words = "river stone light garden letter window morning silver harbour winter forest voice".split()
    return [" ".join(rng.choice(words, size=250 + 20 * i)) + "." for i in range(n)]


# ---------------------------------------------------------------- passkey: LongLoRA's prompt, keys, lengths


def test_passkey_prompt_and_keys_are_the_scripts():
    assert len(passkey.LONGLORA_FILLER) == FILLER_CHARS
    for n_garbage, seed in ((3072, 0), (3840, 3), (60000, 666), (FILLER_CHARS, 9)):
        assert passkey.longlora_passkey_prompt(n_garbage, seed) == script_prompt(n_garbage, seed)
    assert [passkey.longlora_passkey_prompt(3840, s)[1] for s in range(10)] == SCRIPT_KEYS_3840
    keys = [int(passkey.longlora_passkey_prompt(1024, s)[1]) for s in range(3000)]
    assert 1 <= min(keys) and max(keys) <= 49999 and max(keys) > 49000  # randint(1, 50000)
    prompt, key = passkey.longlora_passkey_prompt(3840, 1)
    lines = prompt.split("\n")
    assert lines[0] == TASK and lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert lines[-1] == QUESTION and len(lines[1]) + len(lines[3]) == 3840 and GARBAGE.startswith(lines[3][:80])
    with pytest.raises(ValueError, match="beyond LongLoRA's 449999"):
        passkey.longlora_passkey_prompt(FILLER_CHARS + 1, 0)


def test_passkey_test_points_and_filler_are_the_scripts():
    # lines 128-132: max_tokens // interval points; n_garbage = int(3.75 * (i + 1) * interval // 1024 * 1024)
    lengths = passkey.longlora_lengths(1000, 32000)
    assert lengths[:3] == [1000, 2000, 3000] and lengths[-1] == 32000 and len(lengths) == 32
    assert passkey.longlora_lengths(1000, 32768)[-1] == 32000  # the script's default --max_tokens 32000 and 32768
    # by hand: 3750 // 1024 = 3, 7500 // 1024 = 7, 120000 // 1024 = 117, 122880 // 1024 = 120
    assert [passkey.longlora_filler_chars(L) for L in (1000, 2000, 32000, 32768)] == [3072, 7168, 119808, 122880]
    # seeds 0..num_tests-1 at every length (line 135-136), the same keys at each
    exs = passkey.longlora_passkey_examples([1000, 2000], num_tests=3)
    assert [(e.length, e.answer) for e in exs][:3] == [(1000, script_prompt(3072, s)[1]) for s in range(3)]
    assert [e.answer for e in exs[3:]] == [e.answer for e in exs[:3]]
    assert exs[4].prompt == script_prompt(7168, 1)[0] and exs[4].depth is None


def test_passkey_generates_the_keys_tokens_and_scores_them(tiny, tmp_path):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    _, tok = tiny
    assert tok("12345")["input_ids"][0] != tok.bos_token_id  # the tiny tokenizer adds no BOS ...
    assert passkey.longlora_answer_tokens(tok, "12345") == len(tok("12345")["input_ids"])  # ... so no token is dropped
    # a LLaMA-like tokenizer that adds BOS: the script's answer_ids[:, 1:] drops it (line 76)
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.post_processor = processors.Sequence([
        backend.post_processor,
        processors.TemplateProcessing(single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=tok.bos_token, eos_token=tok.eos_token)
    ids = with_bos("12345")["input_ids"]
    assert ids[0] == with_bos.bos_token_id and passkey.longlora_answer_tokens(with_bos, "12345") == len(ids[1:])
    # line 83: the generated tokens are the key's tokens, nothing more or less
    assert passkey.longlora_passkey_score(" 12345", "12345") == 1.0
    assert passkey.longlora_passkey_score("12345.", "12345") == 0.0
    assert passkey.longlora_passkey_score("1234", "12345") == 0.0


# ---------------------------------------------------------------- sliding-window perplexity


def direct_perplexity(model, tok, texts: list[str], seq_len: int, stride: int, batch: int = 1) -> tuple[float, int]:
    """eval.py's evaluate, written out: windows every ``stride`` tokens of the documents' tokens (EOS
    after each) while one more token remains, the last one dropped; HF's own loss with labels =
    inputs; the mean over batches of ``batch`` windows; 2.71828 ** loss (line 108)."""
    stream = []
    for text in texts:
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    starts = list(range(0, len(stream) - seq_len, stride))
    starts.pop()
    losses = []
    with torch.no_grad():
        for b in range(0, len(starts), batch):
            x = torch.tensor([stream[s:s + seq_len] for s in starts[b:b + batch]])
            losses.append(model(input_ids=x, labels=x).loss.item())
    return 2.71828 ** (sum(losses) / len(losses)), len(starts)


def test_sliding_window_perplexity_is_a_direct_loop_over_the_windows(tiny):
    model, tok = tiny
    texts = books(3)
    stream, docs = token_stream(tok, texts, max_docs=5)
    assert docs == 3 and stream.count(tok.eos_token_id) == 3
    for seq_len, batch in ((256, 1), (256, 4)):  # 4: a short last batch weighs as much as a full one
        ours = sliding_window_perplexity(model, stream, seq_len=seq_len, sliding_window=256, batch_size=batch,
                                         device="cpu")
        ppl, windows = direct_perplexity(model, tok, texts, seq_len, 256, batch)
        assert ours["windows"] == windows and ours["perplexity"] == pytest.approx(ppl, rel=2e-6)
    assert windows % 4  # the case above did have a short batch
    with pytest.raises(ValueError, match="needs more than"):
        sliding_window_perplexity(model, stream[:600], seq_len=512, sliding_window=256, batch_size=1, device="cpu")


# ---------------------------------------------------------------- the eval job, its table and metrics


def tiny_recipe(eval_stage: dict):
    raw = read_recipe_file(ROOT / "recipes" / "tiny.yaml")
    raw["stages"]["eval"] = {"kind": "eval", "model_from": "sft", **eval_stage}
    return recipe_from_dict(raw)


def test_the_eval_job_reports_ppl_by_length_and_passkey_as_longlora(tiny, tmp_path):
    model, tok = tiny
    texts = books(3)
    (tmp_path / "pg19.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    recipe = tiny_recipe({
        "passkey": {"style": "longlora", "interval": 512, "max_tokens": 1100, "num_tests": 2},
        "perplexity": {"source": {"type": "files", "path": str(tmp_path / "pg19.jsonl")},
                       "seq_lens": [256, 512], "sliding_window": 256}})
    store = Store(str(tmp_path / "runs"))
    shutil.copytree(assets.resolve("builtin:tiny-llama"), tmp_path / "runs" / "t" / "model")
    store.write_json_atomic("t/snap/request.json", {"model": "t/model", "model_stage": "sft", "upstream": {},
                                                    "stage": "eval", "recipe": recipe_to_dict(recipe)})
    run_eval_stage(recipe, store, "t", snapshot="t/snap")

    results = store.read_json("t/snap/results.json")
    ppl = results["perplexity"]
    assert sorted(ppl["by_length"], key=int) == ["256", "512"] and ppl["documents"] == 3
    for L in (256, 512):
        direct, windows = direct_perplexity(model, tok, texts, L, 256)
        assert ppl["by_length"][str(L)]["perplexity"] == pytest.approx(direct, rel=2e-6)
        assert ppl["by_length"][str(L)]["windows"] == windows
    items = [json.loads(line) for line in store.read_bytes("t/snap/items.jsonl").decode().splitlines()]
    expected = [(L, *script_prompt(passkey.longlora_filler_chars(L), s)) for L in (512, 1024) for s in range(2)]
    assert [(i["length"], i["answer"]) for i in items] == [(L, key) for L, _, key in expected]
    for i, (_, prompt, _) in zip(items, expected):
        # the achieved token count, tokenized as the script does (the tiny BPE is not LLaMA's 3.75 characters a token)
        assert i["input_tokens"] == len(tok(prompt)["input_ids"]) and i["score"] in (0, 100)
    # a served model's context holds the longest prompt as this tokenizer makes it, and its answer
    assert longlora_context(tok, recipe.stages["eval"].passkey) == max(
        i["input_tokens"] + len(tok(i["answer"])["input_ids"]) for i in items if i["length"] == 1024)
    pk = results["passkey_longlora"]["by_length"]
    assert sorted(pk, key=int) == ["512", "1024"] and pk["512"]["tests"] == 2
    assert pk["1024"]["tokens"] == sum(i["input_tokens"] for i in items if i["length"] == 1024) // 2
    assert results["categories"] == {}  # LongLoRA's passkey is reported on its own, not in Synthetic

    md = store.read_bytes("t/snap/results.md").decode()
    assert "| model | 256 | 512 |" in md  # a column per evaluation length, as LongLoRA's Table 1
    row = next(line for line in md.splitlines() if line.startswith("| sft |"))
    assert row == f"| sft | {ppl['by_length']['256']['perplexity']:.2f} | {ppl['by_length']['512']['perplexity']:.2f} |"
    assert "| 1024 | " in md and "Passkey retrieval (LongLoRA" in md
    metrics = read_manifest_at(store, "t/snap").metrics
    assert metrics["perplexity"]["by_length"] == ppl["by_length"]
    assert metrics["passkey_longlora"]["by_length"] == pk
    side = report.side_by_side("t", {"eval": ("sft", metrics), "eval_b": ("stage1", {"perplexity": {
        "by_length": {"512": {"perplexity": 9.5, "windows": 1, "loss": 2.25}}}})})
    assert "| perplexity at 256 (sliding window) | " in side and "| 9.50 |" in side


# ---------------------------------------------------------------- configs: recipes unchanged, bad input


def test_existing_recipes_validate_and_keep_their_digests():
    from prolong.recipe import load_recipe

    for name in ("tiny.yaml", "prolong-8b.yaml"):
        ev = load_recipe(ROOT / "recipes" / name).stages["eval"]
        digest = ev.digest_dump()
        assert ev.passkey.style == "prolong" and ev.perplexity.seq_lens is None
        assert not {"style", "interval", "max_tokens", "num_tests"} & set(digest["passkey"])
        assert not {"seq_lens", "sliding_window", "batch_size"} & set(digest["perplexity"])
    longlora = tiny_recipe({"passkey": {"style": "longlora", "interval": 512, "max_tokens": "1K"}}).stages["eval"]
    assert longlora.digest_dump()["passkey"]["interval"] == 512 and longlora.lengths_of(longlora.passkey) == [512, 1024]


SOURCE = {"type": "files", "path": "builtin:tiny-corpus/books.jsonl"}


@pytest.mark.parametrize("stage, message", [
    ({"perplexity": {"source": SOURCE, "seq_lens": [256], "sliding_window": 512}},
     "eval.perplexity.sliding_window: 512 is above seq_len 256"),
    ({"perplexity": {"source": SOURCE, "seq_lens": [0]}}, "eval.perplexity.seq_lens.0: Input should be greater than 0"),
    ({"perplexity": {"source": SOURCE, "seq_lens": [-512]}}, "eval.perplexity.seq_lens.0: Input should be greater"),
    ({"perplexity": {"source": SOURCE, "seq_lens": [512], "last": 256}}, "eval.perplexity.last: applies without seq_lens"),
    ({"perplexity": {"source": SOURCE, "sliding_window": 128}}, "eval.perplexity.sliding_window: applies with seq_lens"),
    ({"passkey": {"style": "longlora", "interval": 2000, "max_tokens": 1000}},
     "eval.passkey.interval: 2000 is above max_tokens 1000"),
    ({"passkey": {"style": "longlora", "interval": 200}}, "eval.passkey.interval: 200 tokens gets no filler"),
    ({"passkey": {"style": "longlora", "max_tokens": "128K"}}, "eval.passkey.max_tokens: 131072 needs more filler"),
    ({"passkey": {"style": "longlora", "depths": [0.5]}}, "eval.passkey.depths: applies to style prolong"),
    ({"passkey": {"num_tests": 3}}, "eval.passkey.num_tests: applies to style longlora"),
])
def test_bad_longlora_settings_are_one_line_errors_naming_the_field(stage, message):
    with pytest.raises(ConfigError) as err:
        tiny_recipe(stage)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_seq_lens_beyond_the_model_are_refused_before_the_job(tmp_path):
    from prolong.pipeline import RunContext

    recipe = tiny_recipe({"perplexity": {"source": SOURCE, "seq_lens": ["4K", "16K"]}})
    ctx = RunContext(recipe=recipe, store=Store(str(tmp_path / "runs")), run="t")
    with pytest.raises(ConfigError, match=r"^eval.perplexity.seq_lens: 16384 tokens is beyond the 8192 positions"):
        recipe.graph["eval"].check(ctx, reruns={"eval"})
