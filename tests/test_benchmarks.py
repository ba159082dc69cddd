"""The benchmarks stage's code path (components/rlhf/benchmarks.py), offline: lm-evaluation-harness on the HF export
of a small random model, over a local multiple-choice task file; a task whose dataset is not on this machine is a
clear error before any model loads. (Indexing lm_eval's ~15,000 bundled tasks alone takes 10-40 s on 2 CPUs, so the
tests name tasks of their own folder only.)"""

from __future__ import annotations

import json

import pytest
import torch

from components.rlhf.benchmarks import OFFLINE_ENV, BenchmarkConfig, BenchmarkDataError, benchmark
from flows._stage import stage_config
from model.checkpoint import save_checkpoint
from tests.helpers import debug_model, small_tokenizer

pytest.importorskip("lm_eval")

WORDS = ["mat", "river", "stone", "house", "tree", "light", "dog", "blue"]
TASK_YAML = """task: {name}
dataset_path: {dataset_path}
dataset_kwargs: {dataset_kwargs}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(autouse=True)
def offline_env(monkeypatch):
    """The stage sets these for its process; here they are undone after each test."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)


def choice_logprobs(model, tok, context: str, choices: list[str]) -> list[float]:
    """Our own model's log-likelihood of " <choice>" after BOS + context, split the way lm_eval splits a pair: the
    whole text encoded, the context's tokens cut off the front."""
    scores = []
    for choice in choices:
        context_ids = [tok.bos_id] + tok.encode(context)
        whole = [tok.bos_id] + tok.encode(f"{context} {choice}")
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]])).float(), -1)[0]
        targets = range(len(context_ids), len(whole))
        scores.append(sum(logprobs[t - 1, whole[t]].item() for t in targets))
    return scores


def test_benchmark_runs_a_local_task_on_the_hf_export_and_agrees_with_our_model(tmp_path):
    model, tok = debug_model(std=0.1), small_tokenizer()
    save_checkpoint(tmp_path / "chat", model, tok)
    # Each row's gold answer is the choice our model itself scores highest: the harness, reading the HF export through
    # transformers, must pick it on every row (a wrong weight permutation, tokenizer or missing BOS would not).
    rows = []
    for i in range(12):
        question = f"the {WORDS[i % 8]} sat on the {WORDS[(3 * i + 1) % 8]} and the"
        choices = [WORDS[(i + j) % 8] for j in range(1, 5)]
        scores = choice_logprobs(model, tok, question, choices)
        assert sorted(scores)[-1] - sorted(scores)[-2] > 1e-3  # no near-ties that float noise could flip
        rows.append({"question": question, "choices": choices, "answer": scores.index(max(scores))})
    data = tmp_path / "tasks" / "rows.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("local_mc", "local_mc_copy"):
        (tmp_path / "tasks" / f"{name}.yaml").write_text(TASK_YAML.format(
            name=name, dataset_path="json", dataset_kwargs=json.dumps({"data_files": {"test": str(data)}})))
    # A group, as mmlu is one of 57 tasks: its n is the sum of its tasks'; 1-shot (a few-shot count per task)
    group_yaml = ("group: local_group\ntask: [local_mc_copy]\n"
                  "aggregate_metric_list: [{metric: acc, weight_by_size: true}]\n")
    (tmp_path / "tasks" / "local_group.yaml").write_text(group_yaml)

    cfg = BenchmarkConfig(tasks={"local_mc": 0, "local_group": 1}, include_path=str(tmp_path / "tasks"),
                          batch_size=4)
    results = benchmark(tmp_path / "chat", cfg)

    assert sorted(results) == ["local_group", "local_mc"]
    group = results["local_group"]
    assert (group["n"], group["num_fewshot"], group["metric"]) == (len(rows), 1, "acc") and 0 <= group["value"] <= 1
    row = results["local_mc"]
    assert row["n"] == len(rows) and row["num_fewshot"] == 0 and row["metric"] == "acc"
    assert 0 <= row["value"] <= 1 and set(row["metrics"]) == {"acc", "acc_norm"}
    assert row["value"] == 1.0, "the harness disagrees with our model on the HF export's choices"
    assert row["stderr"] == 0.0  # the sample stderr of twelve 1s
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "the temporary HF export was removed"


def test_a_profile_asking_for_a_dataset_not_on_this_machine_fails_fast_naming_it_and_how_to_provide_it(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # As lm_eval's bundled tasks do: a Hub dataset name, which offline mode must refuse (not fetch, not hang).
    (tasks / "hub_mc.yaml").write_text(TASK_YAML.format(name="hub_mc", dataset_path="llama2-recipe-tests/absent",
                                                        dataset_kwargs="{}"))
    params = {"ray": {}, "benchmarks": {"tasks": {"hub_mc": 5}, "include_path": str(tasks)}}
    cfg = stage_config(params, "benchmarks", BenchmarkConfig)
    with pytest.raises(BenchmarkDataError) as err:
        benchmark(tmp_path / "no-checkpoint", cfg)  # checked before the export: no CheckpointError
    message = str(err.value)
    assert "hub_mc" in message and "not available offline" in message and "llama2-recipe-tests/absent" in message
    assert "HF_DATASETS_OFFLINE" in message and "HF_HOME" in message and "include_path" in message


def test_benchmarks_params_are_checked():
    for bad, match in [({"tasks": {"mmlu": "5"}}, "few-shot count"), ({"dtype": "int8"}, "dtype must be one of"),
                       ({"limit": 0}, "limit must be"), ({"tasks": ["mmlu"]}, "tasks must be dict")]:
        with pytest.raises(SystemExit, match=match):
            stage_config({"ray": {}, "benchmarks": bad}, "benchmarks", BenchmarkConfig)
