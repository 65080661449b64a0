"""``builtin:tiny-lm-eval``: a 4-way multiple-choice lm-eval task on local files, from the stdlib."""

from __future__ import annotations

import json
import random
from pathlib import Path

from prolong.assets.stdlib_docs import module_docs, stdlib_modules


def build_tiny_lm_eval(out: Path, final: Path, deps: dict[str, Path]) -> None:
    """A 4-way multiple-choice task: which module defines this function? (local JSONL + task YAML)."""
    rng = random.Random(1)
    defs: dict[str, list[str]] = {}
    for module, path in stdlib_modules():
        if "." in module:
            continue
        _, items = module_docs(path)
        names = [q for q, sig, _ in items if sig and "." not in q]
        if len(names) >= 3:
            defs[module] = names
    modules = sorted(defs)
    rows = []
    for module in modules:
        for name in rng.sample(defs[module], 2):
            others = rng.sample([m for m in modules if m != module and name not in defs[m]], 3)
            choices = others + [module]
            rng.shuffle(choices)
            rows.append({"question": f"Which standard-library module defines the function `{name}`?",
                         "choices": choices, "answer": choices.index(module)})
    rng.shuffle(rows)
    with open(out / "pymodule_mc.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out / "pymodule_mc.yaml").write_text(
        "task: pymodule_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        # built in a temporary folder that is then renamed: the task file names the final location
        f"  data_files: {{test: {json.dumps(str(final / 'pymodule_mc.jsonl'))}}}\n"
        "test_split: test\n"
        "fewshot_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )
