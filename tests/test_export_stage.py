"""The export stage in a run, through the CLI and Prefect: its files, manifest, model card and
Prefect report; the exported GGUF served by llama.cpp's server and scored like the HF backend;
a server that dies mid-evaluation; bad input refused before any job starts."""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from prolong.export.llama_cpp import converter_dir, read_metadata
from prolong.manifest import read_manifest
from prolong.store import Store, sha256_file
from tasks.stages import artifact_key
from tests.conftest import FAST, prolong_cli, seed, sets
from tests.prefect_helpers import api

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(converter_dir() is None, reason="llama.cpp's converter is not installed")]
RUN = "shipped"
# the tiny-served recipe on stage 1's model (the stages that matter here, kept short); its training
# stages are FAST's, so the data and stage 1 of the session's tiny run are done for it
OVERRIDES = [*(o for o in FAST if o.startswith(("stage1.", "stage2.", "sft."))), "export.from=stage1",
             "export.gguf=[f16,q8_0,Q4_K_M]", "export.max_shard_size=4MB",
             *(f"{e}.{k}" for e in ("eval_export", "eval_served")
               for k in ("lengths=[512]", "helmet.max_items=1")), "eval_export.lm_eval.limit=8"]
STAGES = "data,stage1,export,eval_export,eval_served"


def _env(prefect_server, home: Path) -> dict:
    return {"PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _artifact(env: dict, key: str) -> str:
    found = api(env["PREFECT_API_URL"], "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}})
    assert found, key
    return found[0]["data"]


@pytest.fixture(scope="module")
def shipped(prefect_server, tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("shipped")
    env = _env(prefect_server, root / "prefect-client")
    store = Store(str(root / "runs"))
    seed(tiny_run, store, RUN)  # the run starts at the export of stage 1's model
    args = ["run", "recipes/tiny-served.yaml", "--store", store.url, "--run-name", RUN, "--stages", STAGES,
            *sets(OVERRIDES)]
    prolong_cli(*args, env=env, check=True)
    return store, env, args


def test_the_export_stage_ships_checked_files_with_a_model_card_and_commands(shipped):
    store, env, _ = shipped
    m = read_manifest(store, RUN, "export")
    root = store.local_path(f"{RUN}/export")
    # every file of hf/ and gguf/ is in the manifest with its size and sha256
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parts[len(root.parts)] in ("hf", "gguf")}
    listed = {o["path"]: o for o in m.outputs}
    assert files <= set(listed)
    assert all(listed[f]["bytes"] == (root / f).stat().st_size and listed[f]["sha256"] == sha256_file(root / f)
               for f in files)
    assert {"hf/model.safetensors.index.json", "hf/README.md", "hf/generation_config.json", "hf/tokenizer.json",
            "gguf/tiny-served.f16.gguf", "gguf/tiny-served.q8_0.gguf", "gguf/tiny-served.Q4_K_M.gguf"} <= files
    assert len([f for f in files if f.startswith("hf/model-") and f.endswith(".safetensors")]) >= 2
    config = json.loads((root / "hf/config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 8e6
    assert config["torch_dtype"] == "float16" and config["max_position_embeddings"] == 512
    for t in ("f16", "q8_0", "Q4_K_M"):
        meta = read_metadata(root / f"gguf/tiny-served.{t}.gguf")
        assert (meta["rope_theta"], meta["context_length"], meta["file_type"]) == (8e6, 512, t.upper())
    assert m.metrics["rope_theta"] == 8e6 and m.metrics["context_length"] == 512
    assert m.artifacts["gguf"] == {t: f"gguf/tiny-served.{t}.gguf" for t in ("f16", "q8_0", "Q4_K_M")}

    card = (root / "hf/README.md").read_text()
    assert "license: apache-2.0" in card and "base_model: builtin:tiny-llama" in card
    assert "| stage1 | 512 | 8e+06 | 6 |" in card and "shortmix 40%" in card
    assert read_manifest(store, RUN, "stage1").digest in card and read_manifest(store, RUN, "data").digest in card
    assert "Code version" in card
    # the Prefect UI's report of the stage: files, what was read back from each GGUF, how to run them
    report = _artifact(env, artifact_key(RUN, "export"))
    assert "| `gguf/tiny-served.Q4_K_M.gguf` | Q4_K_M | 8e+06 | 512 | 4096 | gpt-2 |" in report
    assert "python -m llama_cpp.server --model gguf/tiny-served.f16.gguf" in report
    assert "vllm serve ./hf" in report and "AutoModelForCausalLM.from_pretrained('./hf')" in report
    assert store.exists(f"{RUN}/export/logs/export.log")


def _items(store: Store, stage: str) -> list[dict]:
    return [json.loads(x) for x in store.read_text(f"{RUN}/{stage}/items.jsonl").splitlines()]


def test_the_served_gguf_scores_what_the_hf_backend_scores_on_the_same_items(shipped):
    store, env, _ = shipped
    hf, served = _items(store, "eval_export"), _items(store, "eval_served")
    assert len(hf) == len(served) > 20
    strip = lambda items: [{k: v for k, v in i.items() if k != "seconds"} for i in items]  # noqa: E731
    assert strip(hf) == strip(served)
    a, b = (store.read_json(f"{RUN}/{s}/results.json") for s in ("eval_export", "eval_served"))
    assert a["categories"] == b["categories"] and b["failed_items"] == 0
    export = read_manifest(store, RUN, "export")
    f16 = next(o for o in export.outputs if o["path"] == "gguf/tiny-served.f16.gguf")
    assert b["scored_model"] == {"backend": "openai", "engine": "llama_cpp", "server_log": "logs/serve.log",
                                 "artifact": {"path": store.uri(f"{RUN}/export/gguf/tiny-served.f16.gguf"),
                                              "sha256": f16["sha256"], "type": "f16"}}
    assert a["scored_model"] == {"backend": "hf", "model": store.uri(f"{RUN}/export/hf")}
    assert "POST /v1/completions" in store.read_text(f"{RUN}/eval_served/logs/serve.log")
    assert "lm_eval" not in b and a["lm_eval"]["pymodule_mc"]["acc"] is not None  # lm-eval: the hf path only
    for stage in ("eval_export", "eval_served"):  # both tables in the Prefect UI
        assert "| Recall |" in _artifact(env, artifact_key(RUN, stage))


def _kill_server_once_it_answers(store: Store, stop: threading.Event, killed: list) -> None:
    progress = store.local_path(f"{RUN}/eval_served/progress.json")
    while not stop.is_set():
        pids = subprocess.run(["pgrep", "-f", f"llama_cpp.server --model .*{RUN}"], capture_output=True,
                              text=True).stdout.split()
        try:
            started = json.loads(progress.read_text()).get("done", 0) >= 1
        except (OSError, ValueError):
            started = False
        if pids and started:
            os.kill(int(pids[0]), 9)
            killed.append(int(pids[0]))
            return
        time.sleep(0.05)


def test_a_server_that_dies_mid_evaluation_fails_its_items_and_loses_nothing(shipped):
    store, env, args = shipped
    before = read_manifest(store, RUN, "eval_served").digest
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_server_once_it_answers, args=(store, stop, killed), daemon=True)
    watcher.start()
    try:
        out = prolong_cli(*args, "--from-stage", "eval_served", env=env)
    finally:
        stop.set()
    assert killed, "the server was never seen answering"
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 5, out.stderr[-3000:]
    assert "the llama_cpp server exited (exit -9)" in last and "failed, not scored 0" in last, last
    # the earlier, complete evaluation is back in place; the stopped one's items are kept beside it
    assert read_manifest(store, RUN, "eval_served").digest == before
    partial = [json.loads(x) for x in store.read_text(f"{RUN}/eval_served/logs/partial-items.jsonl").splitlines()]
    failed = [i for i in partial if i.get("failed")]
    assert failed and all("score" not in i and "server exited" in i["error"] for i in failed)
    assert any("score" in i for i in partial)  # those answered before it died were scored


def test_bad_export_input_fails_in_one_line_before_any_job(tmp_path, prefect_server, tiny_model_dir):
    env = _env(prefect_server, tmp_path / "prefect-client")
    store = tmp_path / "runs"

    def refused(*extra, env_extra=None, recipe="recipes/tiny.yaml"):
        out = prolong_cli("run", recipe, "--store", str(store), *extra, env={**env, **(env_extra or {})})
        assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
        assert not store.exists()  # checked before the run wrote anything
        return out.stderr.strip().splitlines()[-1]  # above it: the Prefect flow run's log

    assert refused("--set", "export.gguf=[f16,q9_K]").startswith("error: export.gguf: unknown GGUF type 'q9_K'")
    assert refused(env_extra={"LLAMA_CPP_DIR": str(tmp_path / "nowhere")}) == (
        f"error: export.gguf: llama.cpp's converter: LLAMA_CPP_DIR={tmp_path / 'nowhere'} holds no convert_hf_to_gguf.py")
    broken = tmp_path / "shadow" / "llama_cpp"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('libllama.so: cannot open shared object file')\n")
    assert refused("--set", "export.gguf=[f16,Q4_K_M]", env_extra={"PYTHONPATH": str(broken.parent)}) == (
        "error: export.gguf: Q4_K_M need llama.cpp's quantizer, which does not load (ImportError: libllama.so: "
        "cannot open shared object file); infra/install.sh --llama-cpp builds it")

    assert refused("--set", "eval_served.lm_eval={tasks: [pymodule_mc], include_path: builtin:tiny-lm-eval}",
                   recipe="recipes/tiny-served.yaml").startswith(
        "error: eval_served.lm_eval: llama-cpp-python's server does not return the log-probabilities")

    from transformers import GPTJConfig

    gptj = tmp_path / "gptj"  # a rotary model transformers trains and llama.cpp's converter does not know
    GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=16, vocab_size=4096, architectures=["GPTJForCausalLM"]
               ).save_pretrained(gptj)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (gptj / name).write_bytes((Path(tiny_model_dir) / name).read_bytes())
    assert refused("--set", f"model.path={gptj}") == (
        f"error: export.gguf: llama.cpp's converter cannot convert GPTJForCausalLM (model.path {gptj}); "
        "export HF weights only with gguf: []")


def test_a_snapshot_is_exported_beside_its_evaluation(shipped):
    """`prolong evaluate RUN --export`: the newest model of a run (here stage 1's final weights)
    evaluated, then exported with the recipe's export settings into its evals/ folder."""
    store, env, _ = shipped
    # Recall only (its table goes into the card), at one length
    evals = ["eval.lengths=[512]", "eval.json_kv.depths=[0.0,1.0]", "eval.json_kv.max_new_tokens=16",
             *(f"eval.{k}=null" for k in ("helmet", "lm_eval", "perplexity", "passkey", "needle", "position_loss"))]
    out = prolong_cli("evaluate", RUN, "--store", store.url, "--export", *sets([*evals, "export.gguf=[f16]"]),
                      env=env, check=True)
    folder = f"{RUN}/evals/stage1-step00000006"
    assert f"exported to {store.uri(folder + '/export')}" in out.stdout
    from prolong.manifest import read_manifest_at

    m = read_manifest_at(store, f"{folder}/export")
    assert m.stage == "export" and m.upstream == {"stage1": read_manifest(store, RUN, "stage1").digest}
    assert m.artifacts["gguf"] == {"f16": "gguf/tiny-served.f16.gguf"}
    meta = read_metadata(store.local_path(f"{folder}/export/gguf/tiny-served.f16.gguf"))
    assert (meta["rope_theta"], meta["context_length"]) == (8e6, 512)
    card = store.read_text(f"{folder}/export/hf/README.md")
    assert "## Evaluation" in card and "| Recall |" in card  # the snapshot's own results
    again = prolong_cli("evaluate", RUN, "--store", store.url, "--export", *sets([*evals, "export.gguf=[f16]"]),
                        env=env, check=True)
    assert "already evaluated" in again.stdout and read_manifest_at(store, f"{folder}/export").digest == m.digest
