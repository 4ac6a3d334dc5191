"""lm-eval's HF model class on a bitpress model, in memory and from a directory, on a task
defined from local files (no hub access)."""
from __future__ import annotations

import json

import pytest
import torch

import bitpress
from bitpress.nn import Recipe
from bitpress.pipeline.checkpoint import load_tokenizer
from bitpress.pipeline.compress import compress

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    {"question": "The quick brown fox jumps over the lazy", "choices": [" dog.", " scale."],
     "label": 0},
    {"question": "Packed weights are read at memory", "choices": [" speed.", " fox."],
     "label": 0},
    {"question": "A group of weights shares one scale and one zero", "choices": [" dog;",
                                                                                 " point;"],
     "label": 1},
]


def test_hflm_in_memory_and_from_directory(tiny_llama_dir, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from bitpress.integrations.lm_eval import hflm

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    q = tmp_path / "q"
    compress(tiny_llama_dir, q, Recipe(bits=4, group_size=32), progress=False,
             dtype=torch.float32)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "bp_tiny.yaml").write_text(
        "task: bp_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    tm = TaskManager(include_path=str(tasks))
    mem = hflm(bitpress.load(q), load_tokenizer(q))
    disk = hflm(q)
    assert type(disk.model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    results = [lm_eval.simple_evaluate(model=lm, tasks=["bp_tiny"], task_manager=tm,
                                       log_samples=True) for lm in (mem, disk)]
    accs = [r["results"]["bp_tiny"]["acc,none"] for r in results]
    assert accs[0] == accs[1] and 0 <= accs[0] <= 1
    # identical per-choice log-likelihoods in memory and from the directory
    lls = [[s["resps"][i][0][0] for i in range(2)] for s in results[0]["samples"]["bp_tiny"]]
    lls_disk = [[s["resps"][i][0][0] for i in range(2)] for s in results[1]["samples"]["bp_tiny"]]
    assert lls == lls_disk
    assert all(v < 0 for row in lls for v in row)
