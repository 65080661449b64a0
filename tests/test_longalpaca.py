"""LongAlpaca SFT data (issue 17, point 4): LongLoRA's Llama-2 prompt and tokenization, the long-QA
filter of LongLoRA issue #119, bad rows and misplaced options as one-line errors.

The reference below follows LongLoRA's supervised-fine-tune.py (``SupervisedDataset``, ``preprocess``,
``_tokenize_fn``) step by step, written here apart from our code: the prompt text is its PROMPT_DICT's,
the tokenizer is prepared as the script prepares it (special tokens it lacks are added)."""

import json
import typing

import numpy as np
import pytest

from prolong.config import DomainConfig
from prolong.data.mds import StreamKey, read_stream, stream_rel
from prolong.data.pack import pack_concatenated
from prolong.data.prepare import prepare
from prolong.data.sources import LONGLORA_PROMPTS, iter_documents
from prolong.data.tokenize import DocumentTokenizer, load_tokenizer
from prolong.errors import ConfigError, DataError
from prolong.recipe import load_recipe, recipe_from_dict
from prolong.store import Store
from tests.conftest import ROOT

IGNORE_INDEX = -100
_SYS = ("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
        "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, "
        "or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a "
        "question does not make any sense, or is not factually coherent, explain why instead of answering something "
        "not correct. If you don't know the answer to a question, please don't share false information.\n<</SYS>> \n\n")
PROMPT_DICT = {
    "prompt_input_llama2": _SYS + " {instruction} \n{input} [/INST]",
    "prompt_no_input_llama2": _SYS + " {instruction} [/INST]",
    "prompt_llama2": "[INST]{instruction}[/INST]",
}
# which PROMPT_DICT entry the script takes for rows without input: since 2023-11-19, and before
NO_INPUT = {"longlora_llama2": "prompt_llama2", "longlora_llama2_system": "prompt_no_input_llama2"}

PAPER = " ".join(f"Section {i}: attention layers mix tokens; the model reads {i * 7} words here." for i in range(30))
ROWS = [
    {"instruction": f"Below is a paper. Memorize it and answer my question after it.\n{PAPER}\nWhat mixes tokens?",
     "output": "Attention layers.", "file": "paper-1"},
    {"instruction": "Give three tips for staying healthy.", "output": "1. Eat well.\n2. Sleep.\n3. Move.", "file": ""},
    {"instruction": "Translate to French:", "input": "Good morning, {name}!", "output": "Bonjour, {name} !"},
    {"instruction": "Résumé — naïve café {x}", "input": "", "output": "  leading spaces, ünïcödé ✓"},
    {"instruction": "Ends with a space ", "output": " starts with one"},
    # the pad token's text inside a prompt: LongLoRA counts the prompt's length without pad tokens, so
    # the prompt's last token is trained on — reproduced, not corrected
    {"instruction": "A literal <|pad|> inside", "output": "kept as LongLoRA has it"},
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_domain(path, **options):
    return DomainConfig.model_validate({"kind": "sft", "source": {"type": "files", "path": str(path)}, **options})


def longlora_tokenizer(ref: str):
    """The tokenizer as supervised-fine-tune.py sets it up: pad/eos/bos/unk added where missing."""
    tok = load_tokenizer(ref)
    defaults = {"pad_token": "[PAD]", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}
    tok.add_special_tokens({k: v for k, v in defaults.items() if getattr(tok, k) is None})
    return tok


def longlora_reference(rows: list[dict], tok, no_input: str, max_length: int | None = None):
    """(input_ids, labels) per row, as LongLoRA's SupervisedDataset makes them."""
    out = []
    for example in rows:
        template = PROMPT_DICT["prompt_input_llama2"] if example.get("input", "") != "" else PROMPT_DICT[no_input]
        source = template.format_map(example)
        target = f"{example['output']}{tok.eos_token}"
        kw = {"max_length": max_length, "truncation": True} if max_length else {}
        full = tok(source + target, return_tensors="pt", **kw).input_ids[0]
        source_len = tok(source, return_tensors="pt", **kw).input_ids.ne(tok.pad_token_id).sum().item()
        labels = full.clone()
        labels[:source_len] = IGNORE_INDEX
        out.append((full.numpy(), labels.numpy()))
    return out


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """A Llama-like variant of tiny-bpe: BOS added by its post-processor, no pad token."""
    from tokenizers import processors

    tok = load_tokenizer("builtin:tiny-bpe")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.pad_token = None
    path = tmp_path_factory.mktemp("bos") / "tok"
    tok.save_pretrained(path)
    return str(path)


def labels_of(enc) -> np.ndarray:
    return np.where(enc.mask == 1, enc.ids.astype(np.int64), IGNORE_INDEX)


@pytest.mark.parametrize("prompt", ["longlora_llama2", "longlora_llama2_system"])
@pytest.mark.parametrize("which", ["tiny-bpe", "bos-no-pad"])
def test_rows_tokenize_as_longloras_supervised_dataset(tmp_path, prompt, which, bos_tokenizer):
    ref = "builtin:tiny-bpe" if which == "tiny-bpe" else bos_tokenizer
    path = write_rows(tmp_path / "longalpaca.jsonl", ROWS)
    docs = list(iter_documents("la", sft_domain(path, prompt=prompt), seed=0))
    tok = DocumentTokenizer(ref)
    ours = [tok.encode_chat(d) for d in docs]
    expected = longlora_reference(ROWS, longlora_tokenizer(ref), NO_INPUT[prompt])
    assert len(ours) == len(expected) == len(ROWS)
    for enc, (ids, labels) in zip(ours, expected):
        assert enc.ids.dtype == np.uint32 and enc.mask.dtype == np.uint8
        assert enc.ids.astype(np.int64).tolist() == ids.tolist()
        assert labels_of(enc).tolist() == labels.tolist()
        assert enc.ids[-1] == tok.eos and enc.mask[-1] == 1  # the EOS closes the answer and is trained on
        assert (enc.ids[0] == tok.bos) == (which == "bos-no-pad")  # BOS only where the tokenizer adds it
    # the loss covers the answer: the first row's trained tokens decode to its output and the EOS
    first = ours[0].ids.astype(np.int64)
    assert tok.tok.decode(first[ours[0].mask == 1]) == f"Attention layers.{tok.tok.eos_token}"
    assert tok.tok.decode(first[ours[0].mask == 0]).replace(" [/INST]", "[/INST]").endswith("What mixes tokens?[/INST]")
    # a QA longer than the sequence is cut as LongLoRA truncates at model_max_length
    (sample,) = list(pack_concatenated(ours[:1], 64, "la", carry_over=False))
    ((ids, labels),) = longlora_reference(ROWS[:1], longlora_tokenizer(ref), NO_INPUT[prompt], max_length=64)
    assert sample.input_ids.astype(np.int64).tolist() == ids.tolist()
    assert np.where(sample.mask == 1, sample.input_ids.astype(np.int64), IGNORE_INDEX).tolist() == labels.tolist()


def test_prompt_texts_and_options_are_longloras():
    assert LONGLORA_PROMPTS["longlora_llama2"] == (PROMPT_DICT["prompt_llama2"], PROMPT_DICT["prompt_input_llama2"])
    assert LONGLORA_PROMPTS["longlora_llama2_system"] == (PROMPT_DICT["prompt_no_input_llama2"],
                                                          PROMPT_DICT["prompt_input_llama2"])
    options = set(typing.get_args(DomainConfig.model_fields["prompt"].annotation))
    assert options == {"chat_template", *LONGLORA_PROMPTS}
    assert DomainConfig.model_fields["prompt"].default == "chat_template"


def test_a_null_input_reads_as_no_input(tmp_path):
    # LongLoRA would format a JSON null as the text "None"; a missing value is read as no input here
    path = write_rows(tmp_path / "x.jsonl", [{"instruction": "Q", "input": None, "output": "A"}])
    (doc,) = iter_documents("la", sft_domain(path, prompt="longlora_llama2"), seed=0)
    assert (doc.prompt, doc.answer) == ("[INST]Q[/INST]", "A")


@pytest.mark.parametrize("prompt", ["chat_template", "longlora_llama2"])
def test_long_qa_filter_keeps_rows_whose_prompt_is_long_enough(tmp_path, prompt):
    rows = [
        {"instruction": "a" * 99, "output": "dropped: 99 characters", "file": "f1"},
        {"instruction": "b" * 100, "output": "kept: exactly 100", "file": "f2"},
        {"instruction": "c" * 60, "input": "d" * 40, "output": "kept: instruction and input count", "file": "f3"},
        {"instruction": "short QA", "output": "x" * 500, "file": ""},  # a long answer does not count
        {"instruction": "e" * 150, "output": "kept: long", "file": "f5"},
    ]
    path = write_rows(tmp_path / "la.jsonl", rows)
    kept = [d.id for d in iter_documents("la", sft_domain(path, prompt=prompt, min_prompt_chars=100), seed=0)]
    assert kept == [f"{path}:2", f"{path}:3", f"{path}:5"]
    capped = list(iter_documents("la", sft_domain(path, prompt=prompt, min_prompt_chars=100, max_documents=2), seed=0))
    assert [d.id for d in capped] == kept[:2]  # max_documents counts the rows the filter keeps
    assert len(list(iter_documents("la", sft_domain(path, prompt=prompt), seed=0))) == 5  # off by default
    if prompt == "chat_template":  # an instruction's input reaches the chat too
        assert capped[1].messages[0]["content"] == "c" * 60 + "\n\n" + "d" * 40


def test_long_qa_filter_counts_a_chats_non_assistant_turns(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "s" * 40}, {"role": "user", "content": "u" * 60},
                          {"role": "assistant", "content": "a" * 900}]},
            {"messages": [{"role": "user", "content": "u" * 99}, {"role": "assistant", "content": "a" * 900}]}]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    assert [d.id for d in iter_documents("c", sft_domain(path, min_prompt_chars=100), seed=0)] == [f"{path}:1"]


@pytest.mark.parametrize("prompt", ["chat_template", "longlora_llama2"])
@pytest.mark.parametrize("row, message", [
    ({"instruction": "Q?"}, r"x.jsonl:2: no field 'output'"),
    ({"instruction": 3, "output": "A"}, r"x.jsonl:2: field 'instruction' must be a string, not int"),
    ({"instruction": "Q?", "output": None}, r"x.jsonl:2: field 'output' must be a string, not null"),
    ({"instruction": "Q?", "input": ["x"], "output": "A"}, r"x.jsonl:2: field 'input' must be a string, not list"),
])
def test_bad_rows_are_one_line_errors_naming_file_and_line(tmp_path, prompt, row, message):
    path = write_rows(tmp_path / "x.jsonl", [{"instruction": "fine", "output": "fine"}, row])
    with pytest.raises(DataError, match=message) as err:
        list(iter_documents("la", sft_domain(path, prompt=prompt), seed=0))
    assert "\n" not in str(err.value) and "data.domains.la.source" in str(err.value)


def test_a_longlora_prompt_reads_instruction_rows_only(tmp_path):
    path = write_rows(tmp_path / "x.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"x.jsonl:1: no field 'instruction'"):
        list(iter_documents("la", sft_domain(path, prompt="longlora_llama2"), seed=0))


@pytest.mark.parametrize("override, message", [
    ("data.domains.books.prompt=longlora_llama2", r"data\.domains\.books\.prompt: applies to sft domains only"),
    ("data.domains.shortmix.min_prompt_chars=1000", r"data\.domains\.shortmix\.min_prompt_chars: applies to sft"),
    ("data.domains.chat.prompt=llama3", r"data\.domains\.chat\.prompt: Input should be"),
    ("data.domains.chat.min_prompt_chars=0", r"data\.domains\.chat\.min_prompt_chars: Input should be greater"),
])
def test_options_outside_an_sft_domain_or_invalid_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(ROOT / "recipes" / "tiny.yaml", [override])
    assert "\n" not in str(err.value)


def test_the_new_options_leave_existing_data_digests_alone():
    tiny = load_recipe(ROOT / "recipes" / "tiny.yaml")
    explicit = load_recipe(ROOT / "recipes" / "tiny.yaml", ["data.domains.chat.prompt=chat_template"])
    longlora = load_recipe(ROOT / "recipes" / "tiny.yaml", ["data.domains.chat.prompt=longlora_llama2"])
    filtered = load_recipe(ROOT / "recipes" / "tiny.yaml", ["data.domains.chat.min_prompt_chars=10"])
    assert "prompt" not in tiny.data.digest_dump()["domains"]["chat"]
    assert tiny.stage("data").config_digest() == explicit.stage("data").config_digest()
    assert len({r.stage("data").config_digest() for r in (tiny, longlora, filtered)}) == 3


def test_builtin_longalpaca_rows_split_into_long_and_short_qa():
    from prolong import assets

    path = assets.resolve("builtin:tiny-corpus/longalpaca.jsonl")
    rows = [json.loads(line) for line in open(path)]
    assert rows and all(set(r) == {"instruction", "output", "file"} for r in rows)
    long = [r for r in rows if r["file"]]
    assert 0 < len(rows) - len(long) < len(long)  # fewer short QA than long, as in LongAlpaca-12k
    assert max(len(r["instruction"]) for r in rows if not r["file"]) < 1000 <= min(len(r["instruction"]) for r in long)
    for r in long:  # the question is about a function whose section is in the file read before it
        qualified = r["instruction"].rsplit("What does `", 1)[1].split("`")[0]
        assert f"\n## {qualified}(" in r["instruction"]
    domain = sft_domain(path, prompt="longlora_llama2", min_prompt_chars=1000)
    assert [d.answer for d in iter_documents("la", domain, seed=0)] == [r["output"] for r in long]


def test_the_data_stage_writes_longlora_tokenized_long_qa(tmp_path):
    """Through the real data stage into MDS: every packed document is a prefix of LongLoRA's tokenization
    of a long-QA row (ids and loss mask), and no short-QA row is in the stream."""
    long_rows = [{"instruction": f"Read the notes. {'note ' * (15 + 3 * i)}\nWhich note is {i}?",
                  "output": f"Note {i}.", "file": f"notes-{i}"} for i in range(24)]
    short_rows = [{"instruction": f"Say {i}.", "output": f"{i}", "file": ""} for i in range(8)]
    rows = [r for i, long in enumerate(long_rows) for r in ([long, short_rows[i]] if i < len(short_rows) else [long])]
    path = write_rows(tmp_path / "la.jsonl", rows)
    raw = {"name": "la", "model": {"path": "builtin:tiny-llama", "tokenizer": "builtin:tiny-bpe", "dtype": "float32"},
           "data": {"domains": {"la": {"kind": "sft", "prompt": "longlora_llama2", "min_prompt_chars": 60,
                                       "source": {"type": "files", "path": str(path)}}}},
           "stages": {"data": {"kind": "data"},
                      "sft": {"kind": "train", "objective": "sft", "seq_len": 128, "rope_theta": 1e4, "steps": 2,
                              "batch_tokens": 256, "lr": 1e-3, "mixture": {"la": 1.0}}}}
    store = Store(str(tmp_path / "runs"))
    prepare(recipe_from_dict(raw), store, "t")
    expected = longlora_reference(long_rows + short_rows, longlora_tokenizer("builtin:tiny-bpe"), "prompt_llama2")
    samples = read_stream(store.uri(stream_rel("t", StreamKey(128, "la"))), tmp_path / "cache")
    assert len(samples) == 4
    found = set()
    for s in samples:
        ids, mask = np.asarray(s["input_ids"], dtype=np.int64), np.asarray(s["mask"])
        for start, end in np.asarray(s["indices"]).reshape(-1, 2):
            piece = ids[start:end].tolist()
            # a piece cut inside a prompt is a prefix of every row with at least as many notes
            matches = [i for i, (ref, _) in enumerate(expected) if ref[:len(piece)].tolist() == piece]
            assert matches and all(i < len(long_rows) for i in matches)  # long QA only: the short were dropped
            labels = np.where(mask[start:end] == 1, ids[start:end], IGNORE_INDEX).tolist()
            assert all(labels == expected[i][1][:len(piece)].tolist() for i in matches)
            if len(matches) == 1:
                found.add(matches[0])
    assert len(found) >= 4
