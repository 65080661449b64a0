"""Short-context tasks through lm-eval (the Open LLM Leaderboard's), so long-context training is
seen not to cost general ability: one ``lm_eval.simple_evaluate`` call per distinct shot count."""

from __future__ import annotations

from collections import defaultdict

from prolong import assets


def run_lm_eval(model_dir: str, cfg, max_length: int, dtype: str, device,
                progress=None) -> dict:
    """One lm-eval call per distinct shot count (the Open LLM Leaderboard v1 convention)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    include = assets.resolve(cfg.include_path) if cfg.include_path else None
    manager = TaskManager(include_path=include) if include else TaskManager()
    by_shots = defaultdict(list)
    for task in cfg.tasks:
        by_shots[cfg.shots(task)].append(task)
    results = {}
    for shots, tasks in sorted(by_shots.items()):
        if progress is not None:
            progress.part("lm-eval", shots)
        out = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": model_dir, "dtype": dtype, "max_length": max_length},
            tasks=tasks, num_fewshot=shots, limit=cfg.limit, batch_size=cfg.batch_size, device=str(device),
            task_manager=manager, log_samples=False, bootstrap_iters=0)
        for task, metrics in out["results"].items():
            # lm-eval names metrics "acc,none", "acc_stderr,none", ...; keep metric values only
            results[task] = {"num_fewshot": shots, **{k.split(",")[0]: v for k, v in metrics.items()
                                                       if "," in k and isinstance(v, (int, float))}}
    return results
