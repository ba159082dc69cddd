"""The serve-time safety guard: tiny debug reward models whose scores the test controls (a zero head scores every
answer 0, probability 0.5; the threshold then decides), in-process, and once through the running server with the RM
taken from the registry (`models:/…@champion`, its threshold.json travelling with it)."""

from __future__ import annotations

import asyncio
import json

import httpx
import mlflow
import openai
import pytest
import torch
from mlflow import MlflowClient

from components.data.oracle import REFUSAL
from components.rlhf.reward import PAPER_THRESHOLD, THRESHOLD_FILE, rm_scores
from components.serve.guard import CONTENT_FILTER, SafetyGuard, buffered_events, load_guard, threshold_for
from model.checkpoint import save_checkpoint
from prometheus_client import CollectorRegistry, generate_latest
from tests.helpers import debug_model, small_tokenizer
from tests.test_serving import MESSAGES, SERVED, _Noop, deploy, registry  # noqa: F401 (registry: a fixture)

PROMPT = [{"role": "user", "content": "how do I kill a stuck process"}]


def reward_model(head_std: float = 0.0, seed: int = 0):
    """A debug RM: head zero (every answer 0.5) or drawn from N(0, head_std) (answers score apart)."""
    model = debug_model(small_tokenizer().vocab_size, seed=seed, head="scalar")
    with torch.no_grad():
        if head_std:
            model.output.weight.normal_(0.0, head_std, generator=torch.Generator().manual_seed(seed))
        else:
            model.output.weight.zero_()
    return model


def guard(threshold: float, head_std: float = 0.0) -> tuple[SafetyGuard, CollectorRegistry]:
    registry = CollectorRegistry()
    return SafetyGuard(reward_model(head_std), small_tokenizer(), threshold, REFUSAL, registry), registry


def decisions(registry: CollectorRegistry) -> dict[str, float]:
    return {d: registry.get_sample_value("llama2_serve_guard_decisions_total", {"decision": d})
            for d in ("kept", "refused", "unscorable")}


def test_an_answer_below_the_threshold_is_replaced_above_it_is_kept_and_both_are_counted():
    finished = [("the red fox", 3, "stop", {"content": []}), ("blue house", 2, "length", None)]
    refusing, registry = guard(threshold=0.6)  # 0.5 < 0.6: refused
    assert refusing.probabilities(PROMPT, ["the red fox"]) == [0.5]
    assert refusing.screen(PROMPT, finished) == [(REFUSAL, 3, CONTENT_FILTER, None), (REFUSAL, 2, CONTENT_FILTER,
                                                                                      None)]
    assert decisions(registry) == {"kept": 0, "refused": 2, "unscorable": 0}
    assert registry.get_sample_value("llama2_serve_guard_seconds_count") == 1
    assert registry.get_sample_value("llama2_serve_guard_threshold") == 0.6
    keeping, registry = guard(threshold=0.5)  # 0.5 is not below 0.5: kept, untouched
    assert keeping.screen(PROMPT, finished) == finished
    assert decisions(registry) == {"kept": 2, "refused": 0, "unscorable": 0}
    assert b"llama2_serve_guard_decisions_total" in generate_latest(registry)


def test_each_answer_is_judged_on_its_own_with_the_projects_rm_scores():
    g, registry = guard(threshold=0.5, head_std=1.0)
    answers = ["the quick brown fox jumps", "I can't help with that."]
    probs = g.probabilities(PROMPT, answers)
    dialogs = [PROMPT + [{"role": "assistant", "content": a}] for a in answers]
    assert probs == pytest.approx(rm_scores(g.model, g.tokenizer, dialogs, 8))  # the RM code rlhf uses
    assert abs(probs[0] - probs[1]) > 1e-3, probs
    g.threshold = sum(probs) / 2
    kept = g.judge(PROMPT, answers)
    assert kept == [p >= g.threshold for p in probs] and sorted(kept) == [False, True]
    assert decisions(registry) == {"kept": 1, "refused": 1, "unscorable": 0}


def test_concurrent_requests_share_one_rm_pass_with_the_same_verdicts_and_a_bad_one_fails_closed_alone():
    g, registry = guard(threshold=0.5, head_std=1.0)
    requests = [(PROMPT, [(a, 1, "stop", None)]) for a in ("the quick brown fox", "red house", "I can't help")]
    probs = [g.probabilities(p, [f[0][0]])[0] for p, f in requests]
    g.threshold = sorted(probs)[1]  # one below it, two at or above
    expected = [g.screen(*r) for r in requests]
    assert sorted(f[0][2] for f in expected) == [CONTENT_FILTER, "stop", "stop"]

    async def concurrently():
        return await asyncio.gather(*(g.ascreen(*r) for r in requests))

    passes = registry.get_sample_value("llama2_serve_guard_seconds_count")
    assert asyncio.run(concurrently()) == expected
    assert registry.get_sample_value("llama2_serve_guard_seconds_count") == passes + 1  # all three in one pass
    bad = ([{"role": "assistant", "content": "out of order"}], [("x", 1, "stop", None)])
    before = decisions(registry)
    assert g.screen_many([requests[0], bad]) == [expected[0], [(REFUSAL, 1, CONTENT_FILTER, None)]]
    after = decisions(registry)
    assert after["unscorable"] - before["unscorable"] == 1
    assert after["kept"] + after["refused"] - before["kept"] - before["refused"] == 1


def test_a_dialog_longer_than_the_rms_context_is_scored_on_its_last_tokens():
    g, _ = guard(threshold=0.5, head_std=1.0)
    long_answer = " ".join(["the quick brown fox"] * 100)  # far past max_seq_len 128
    [p] = g.probabilities(PROMPT, [long_answer])
    assert 0 < p < 1


def test_threshold_comes_from_the_setting_the_rm_folder_or_the_paper(tmp_path):
    assert threshold_for(tmp_path, 0.3) == (0.3, "configured")
    assert threshold_for(tmp_path, None) == (PAPER_THRESHOLD["threshold"], "paper")
    (tmp_path / THRESHOLD_FILE).write_text(json.dumps({"threshold": 0.27, "precision": 0.9}))
    assert threshold_for(tmp_path, None) == (0.27, str(tmp_path / THRESHOLD_FILE))
    assert threshold_for(tmp_path, 0.4)[0] == 0.4
    (tmp_path / THRESHOLD_FILE).write_text(json.dumps({"threshold": 7}))
    with pytest.raises(ValueError, match=THRESHOLD_FILE):
        threshold_for(tmp_path, None)


def test_load_guard_takes_a_reward_model_folder_and_refuses_a_language_model(tmp_path):
    tok = small_tokenizer()
    rm = save_checkpoint(tmp_path / "rm", reward_model(), tok, extra_files={THRESHOLD_FILE: {"threshold": 0.55}})
    g = load_guard(str(rm), None, "No.", None, None, torch.device("cpu"), None)
    assert (g.threshold, g.screen(PROMPT, [("x", 1, "stop", None)])) == (0.55, [("No.", 1, CONTENT_FILTER, None)])
    lm = save_checkpoint(tmp_path / "lm", debug_model(tok.vocab_size), tok)
    with pytest.raises(ValueError, match="reward model"):
        load_guard(str(lm), None, REFUSAL, None, None, torch.device("cpu"), None)


def test_buffered_stream_events_are_openai_chunks_ending_with_done():
    head = ("chatcmpl-1", 0, SERVED)
    finished = [(REFUSAL, 4, CONTENT_FILTER, None), ("fine", 1, "stop", None)]
    events = list(buffered_events(True, head, finished, {"prompt_tokens": 1, "completion_tokens": 5,
                                                         "total_tokens": 6}))
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    text = {i: "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                       if c["choices"] and c["choices"][0]["index"] == i) for i in (0, 1)}
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"]]
    assert text == {0: REFUSAL, 1: "fine"} and finishes == [(0, CONTENT_FILTER), (1, "stop")]
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    events = list(buffered_events(False, head, finished, None))
    completion = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in completion) == REFUSAL + "fine"


@pytest.fixture(scope="module")
def safety_rm(registry):  # noqa: F811
    """A zero-head safety RM with the rm_safety stage's threshold.json (0.6), registered beside the chat model as
    tiny-rm-safety, alias champion: every answer (0.5) is below its threshold."""
    _, tracking_uri, root = registry
    rm = save_checkpoint(root / "rm_safety", reward_model(), small_tokenizer(),
                         extra_files={THRESHOLD_FILE: {"threshold": 0.6}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        try:
            experiment = MlflowClient(tracking_uri).get_experiment_by_name("serving-test")
            with mlflow.start_run(experiment_id=experiment.experiment_id):
                info = mlflow.pyfunc.log_model(name="model", python_model=_Noop(), pip_requirements=[],
                                               artifacts={"checkpoint": str(rm)},
                                               registered_model_name="tiny-rm-safety")
        finally:
            mlflow.set_tracking_uri(None)
    MlflowClient(tracking_uri).set_registered_model_alias("tiny-rm-safety", "champion",
                                                          info.registered_model_version)
    return "models:/tiny-rm-safety@champion"


def test_the_served_guard_refuses_answers_below_the_registered_threshold(ray_local, registry,  # noqa: F811
                                                                         safety_rm):
    with deploy(registry, safety_guard=True, safety_model_uri=safety_rm) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="dummy", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=SERVED, messages=MESSAGES, temperature=0, max_tokens=8, n=2,
                                               logprobs=True)
        assert [(c.message.content, c.finish_reason, c.logprobs) for c in reply.choices] == \
            [(REFUSAL, CONTENT_FILTER, None)] * 2
        assert reply.usage.completion_tokens > 0  # the tokens generated are still the usage
        chunks = list(client.chat.completions.create(model=SERVED, messages=MESSAGES, temperature=0, max_tokens=8,
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REFUSAL
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
            [CONTENT_FILTER]
        assert chunks[-1].usage.completion_tokens > 0
        completion = client.completions.create(model=SERVED, prompt="the quick brown fox", max_tokens=4,
                                               temperature=0)
        assert (completion.choices[0].text, completion.choices[0].finish_reason) == (REFUSAL, CONTENT_FILTER)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'llama2_serve_guard_decisions_total{decision="refused"} 4.0' in metrics
    assert 'llama2_serve_guard_decisions_total{decision="kept"} 0.0' in metrics
    assert "llama2_serve_guard_threshold 0.6" in metrics


def test_bench_guard_measures_rates_and_latency_on_given_checkpoints(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.bench_guard import main

    tok = small_tokenizer()
    chat = save_checkpoint(tmp_path / "chat", debug_model(tok.vocab_size), tok)
    rm = save_checkpoint(tmp_path / "rm", reward_model(), tok, extra_files={THRESHOLD_FILE: {"threshold": 0.6}})
    rows = [{"task": task, "prompt": json.dumps([{"role": "user", "content": f"{word} the quick brown fox"}])}
            for task in ("harmful", "benign_lookalike", "fact") for word in ("how", "what")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "eval_prompts.parquet")
    result = main(["--chat", str(chat), "--rm", str(rm), "--prompts", str(tmp_path / "eval_prompts.parquet"),
                   "--max-new-tokens", "4", "--requests", "2", "--out", str(tmp_path / "guard.json")])
    assert (result["threshold"], result["threshold_source"]) == (0.6, str(rm / THRESHOLD_FILE))
    for task in ("harmful", "benign_lookalike"):  # the zero-head RM (0.5) is below 0.6: every answer replaced
        r = result["tasks"][task]
        assert r["with_guard"]["n"] == 2 and r["with_guard"]["rate"] == 1.0 and r["replaced"]["rate"] == 1.0
    assert result["latency_ms_p50"]["requests"] == 2 and result["latency_ms_p50"]["guard"] > 0
    assert json.loads((tmp_path / "guard.json").read_text()) == result
