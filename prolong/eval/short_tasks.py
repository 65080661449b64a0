"""Short-context tasks through lm-eval (the Open LLM Leaderboard's), so long-context training is
seen not to cost general ability: one ``lm_eval.simple_evaluate`` call per distinct shot count —
on the model itself (lm-eval's ``hf``), or a served one through lm-eval's own ``local-completions``
(the server must echo the prompt with the log-probability of every token and of the one it adds,
as vLLM's does; llama-cpp-python's leaves the added one out, so recipes cannot ask it for lm-eval)."""

from __future__ import annotations

from collections import defaultdict

from prolong import assets
from prolong.errors import StageError


def run_lm_eval(model_dir: str, cfg, max_length: int, dtype: str, device, progress=None, served=None,
                stage: str = "eval") -> dict:
    """One lm-eval call per distinct shot count (the Open LLM Leaderboard v1 convention); ``served``:
    a :class:`prolong.eval.serving.ServedGenerator` to send lm-eval's requests to instead."""
    import lm_eval

    manager = _task_manager(assets.resolve(cfg.include_path) if cfg.include_path else None, cfg.tasks)
    by_shots = defaultdict(list)
    for task in cfg.tasks:
        by_shots[cfg.shots(task)].append(task)
    if served is not None:
        _check_prompt_scoring(served, stage)
    results = {}
    for shots, tasks in sorted(by_shots.items()):
        if progress is not None:
            progress.part("lm-eval", shots)
        if served is None:
            model, args = "hf", {"pretrained": model_dir, "dtype": dtype, "max_length": max_length}
        else:
            model = "local-completions"
            args = {"base_url": f"{served.base_url}/completions", "model": served.model, "tokenizer": model_dir,
                    "tokenizer_backend": "huggingface", "max_length": max_length, "num_concurrent": 1,
                    "max_retries": 2, "tokenized_requests": False}
        try:
            out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, num_fewshot=shots,
                                          limit=cfg.limit, batch_size=cfg.batch_size, device=str(device),
                                          task_manager=manager, log_samples=False, bootstrap_iters=0)
        except Exception as e:
            if served is None:
                raise
            raise StageError(f"{stage}.lm_eval: lm-eval's local-completions could not score {', '.join(tasks)} on "
                             f"{served.base_url} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "the server must return prompt log-probabilities") from None
        for task, metrics in out["results"].items():
            # lm-eval names metrics "acc,none", "acc_stderr,none", ...; keep metric values only
            results[task] = {"num_fewshot": shots, **{k.split(",")[0]: v for k, v in metrics.items()
                                                       if "," in k and isinstance(v, (int, float))}}
    return results


def _task_manager(include: str | None, tasks: list[str]):
    """lm-eval's task index. Indexing its thousands of built-in task YAMLs takes seconds in every
    evaluation job, so when the recipe's own folder defines each task asked for (as tasks, not
    groups or tags, which may name built-in ones) only that folder is indexed."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    if not include:
        return TaskManager()
    local = TaskManager(include_path=include, include_defaults=False)
    entries = local.task_index
    if all(t in entries and entries[t].kind in (Kind.TASK, Kind.PY_TASK) for t in tasks):
        return local
    return TaskManager(include_path=include)


def _check_prompt_scoring(served, stage: str) -> None:
    """lm-eval scores a continuation as ``token_logprobs[len(context):-1]`` of an echoed prompt with one
    token added: a server whose echo leaves the added token out would lose each answer's last token."""
    import httpx

    prompt = "The quick brown fox jumps over the lazy dog. The quick brown"
    try:
        r = httpx.post(f"{served.base_url}/completions", headers=served.headers, timeout=60,
                       json={"model": served.model, "prompt": prompt, "max_tokens": 1, "logprobs": 1, "echo": True,
                             "temperature": 0})
        choice = r.json()["choices"][0]
        logprobs = choice["logprobs"]["token_logprobs"]
    except Exception as e:
        raise StageError(f"{stage}.lm_eval: {served.base_url} does not return prompt log-probabilities "
                         f"(echo with logprobs: {type(e).__name__}: {e}); lm-eval's local-completions needs them") from None
    if len(logprobs) < len(served.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1:
        raise StageError(f"{stage}.lm_eval: {served.base_url} echoes the prompt without the log-probability of the "
                         "token it adds, which lm-eval's local-completions scores with; run lm_eval with backend: hf")
