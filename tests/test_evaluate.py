"""Evaluation on the sampler's Ray Data actor pool gives exactly the numbers the driver-side evaluation gave (the code
it replaced, kept below as the reference): same greedy fp32 decode, same batches, same reward-model scores. Every
metric carries its n and 95% interval; the eval set has a hash; the gate re-evaluates a registered champion."""

from __future__ import annotations

import json

import pytest
import torch

from components.cluster import RayConfig
from components.data import oracle
from components.data.tables import generate_world
from components.data.world import WorldConfig
from components.rlhf.evaluate import EvalConfig, eval_set_sha256, evaluate_checkpoint, score_answers
from components.rlhf.reward import init_reward_model, rm_scores
from components.rlhf.sampling import answer_turns
from components.rlhf.stats import mean_summary, rate_summary
from model.chat import encode_prompt
from model.checkpoint import load_checkpoint, save_checkpoint
from model.generation import SamplingParams, generate
from tests.helpers import debug_model, small_tokenizer

WORLD = {"n_pretrain_docs": 20, "n_sft": 10, "n_pref_pairs": 10, "n_rl_prompts": 10, "n_gatt_dialogs": 4,
         "n_eval_prompts": 10, "n_eval_gatt": 3, "eval_gatt_turns": 3}
# Batches of 3: 10 prompts in 4 generate() calls; 3 GAtt dialogs of 2 and 3 turns (one batch a turn, as the profiles'
# eval_gatt: an actor answers batch_size dialogs to the end, so more would regroup the later turns' batches).
CFG = EvalConfig(max_new_tokens=8, batch_size=3, ray=RayConfig(num_workers=2, cpus_per_worker=1))


# ------------------------------------------------------------------------ the driver-side evaluation it replaced
def _generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size):
    texts = []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    for start in range(0, len(prompts), batch_size):
        out = generate(model, prompts[start:start + batch_size], params, tokenizer.eos_id, tokenizer.pad_id)
        texts += [tokenizer.decode(t).strip() for t in out.tokens]
    return texts


def _driver_prompts(model, tokenizer, records, reward_models, max_new_tokens, batch_size):
    """Decoding and RM scoring as the driver did them; the oracle's aggregation is the one evaluate still uses."""
    prompts = [json.loads(r["prompt"]) for r in records]
    responses = _generate_texts(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens,
                                batch_size)
    metrics, samples = score_answers(records, prompts, responses)
    dialogs = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
    for name, rm in reward_models.items():
        scores = rm_scores(rm, tokenizer, dialogs, batch_size)
        metrics.update(mean_summary(f"{name}_score", scores))
    return metrics, samples


def _driver_gatt(model, tokenizer, dialogs, max_new_tokens, batch_size):
    histories = [[{"role": "system", "content": d["system"]}] for d in dialogs]
    user_turns = [[m["content"] for m in json.loads(d["messages"]) if m["role"] == "user"] for d in dialogs]
    by_turn, said = {}, [[] for _ in dialogs]
    for turn in range(max(len(u) for u in user_turns)):
        active = [i for i, u in enumerate(user_turns) if turn < len(u)]
        for i in active:
            histories[i].append({"role": "user", "content": user_turns[i][turn]})
        answers = _generate_texts(model, tokenizer, [encode_prompt(tokenizer, histories[i]) for i in active],
                                  max_new_tokens, batch_size)
        hits = []
        for i, answer in zip(active, answers):
            histories[i].append({"role": "assistant", "content": answer})
            said[i].append(answer)
            hits.append(oracle.gatt_adherence(dialogs[i]["instruction"], answer))
        by_turn.update(rate_summary(f"gatt_turn{turn + 1}", hits))
    for instruction in sorted({d["instruction"] for d in dialogs}):  # turns 2-4, per instruction, by dialog
        turns = [(i, said[i][t]) for i, d in enumerate(dialogs) if d["instruction"] == instruction
                 for t in (1, 2, 3) if t < len(said[i])]
        if turns:
            by_turn.update(rate_summary(f"gatt_{instruction}", [oracle.gatt_adherence(instruction, a)
                                                                for _, a in turns], [i for i, _ in turns]))
    return by_turn, said


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    tok = small_tokenizer()
    policy = debug_model(vocab_size=tok.vocab_size, max_seq_len=512)
    save_checkpoint(folder / "policy", policy, tok)
    for i, name in enumerate(("rm_helpful", "rm_safety")):
        rm = init_reward_model(policy, head_std=0.5, generator=torch.Generator().manual_seed(i))
        save_checkpoint(folder / name, rm, tok)
    world = generate_world(WorldConfig.from_dict(WORLD))
    gatt = world["eval_gatt"].to_pylist()
    gatt[0]["messages"] = json.dumps(json.loads(gatt[0]["messages"])[:4])  # dialogs of 2 and 3 turns
    return folder, world["eval_prompts"].to_pylist(), gatt


def test_evaluation_on_the_actor_pool_equals_the_driver_side_evaluation(ray_local, setup):
    folder, records, gatt = setup
    rm_paths = {name: folder / name for name in ("rm_helpful", "rm_safety")}
    turns = [sum(m["role"] == "user" for m in json.loads(d["messages"])) for d in gatt]
    assert len(set(turns)) > 1 and len(gatt) == CFG.batch_size and len(records) % CFG.batch_size  # a short batch

    metrics, samples = evaluate_checkpoint(folder / "policy", records, gatt, rm_paths, CFG)

    torch.set_num_threads(int(CFG.ray.cpus_per_worker))  # as the actors: float sums depend on the thread split
    try:
        model, tok = load_checkpoint(folder / "policy")
        rms = {name: load_checkpoint(p)[0] for name, p in rm_paths.items()}
        expected, expected_samples = _driver_prompts(model, tok, records, rms, CFG.max_new_tokens, CFG.batch_size)
        by_turn, said = _driver_gatt(model, tok, gatt, CFG.max_new_tokens, CFG.batch_size)
    finally:
        torch.set_num_threads(2)
    expected.update(by_turn)
    assert metrics == expected  # exactly: RM means included
    values = {k: v for k, v in metrics.items() if not k.endswith(("_n", "_ci95", "_items"))}
    assert {"helpfulness", "safety", "refusal_rate_harmful", "false_refusal_rate", "rm_helpful_score",
            "rm_safety_score", "gatt_turn3"} <= set(values)
    for key, value in values.items():  # every metric with its n and an interval around it
        lo, hi = metrics[f"{key}_ci95"]
        assert metrics[f"{key}_n"] > 0 and 0.0 <= lo <= value <= hi <= 1.0, key
    assert metrics["helpfulness_n"] + metrics["refusal_rate_harmful_n"] == len(records) == metrics["safety_n"]
    assert metrics["gatt_turn1_n"] == len(gatt) > metrics["gatt_turn3_n"] > 0
    by_instruction = [k for k in values if k.startswith("gatt_") and not k.startswith("gatt_turn")]
    assert by_instruction and sum(metrics[f"{k}_n"] for k in by_instruction) == sum(
        metrics[f"gatt_turn{t}_n"] for t in (2, 3, 4) if f"gatt_turn{t}_n" in metrics)  # turns 2-4, each once
    assert samples == expected_samples
    assert len({s["response"] for s in samples}) > 1  # real, varied answers
    dialogs = [{"system": d["system"], "users": [m["content"] for m in json.loads(d["messages"])
                                                 if m["role"] == "user"]} for d in gatt]
    assert answer_turns(dialogs, folder / "policy", CFG.sampling(), CFG.ray) == said  # every turn's text


def test_models_evaluated_in_one_pass_equal_each_evaluated_alone(ray_local, setup):
    """evaluate_checkpoints: several models (and both reward models, loaded once) in one Ray Data pass, their jobs
    interleaved on two actors that load a model when a job needs it: each model's metrics and answers are exactly
    those of evaluating it alone."""
    from components.rlhf.evaluate import evaluate_checkpoints

    folder, records, gatt = setup
    tok = small_tokenizer()
    other = save_checkpoint(folder / "other", debug_model(tok.vocab_size, seed=2, max_seq_len=512), tok)
    rm_paths = {name: folder / name for name in ("rm_helpful", "rm_safety")}
    both = evaluate_checkpoints({"policy": folder / "policy", "other": other}, records, gatt, rm_paths, CFG)
    assert list(both) == ["policy", "other"] and both["policy"][1] != both["other"][1]
    for name, ckpt in (("policy", folder / "policy"), ("other", other)):
        assert both[name] == evaluate_checkpoint(ckpt, records, gatt, rm_paths, CFG)


def test_eval_set_hash_is_canonical_and_sensitive(setup):
    _, records, gatt = setup
    digest = eval_set_sha256(records, gatt)
    assert len(digest) == 64 and eval_set_sha256([dict(reversed(r.items())) for r in records], gatt) == digest
    assert eval_set_sha256(records[:-1], gatt) != digest and eval_set_sha256(records, gatt[:-1]) != digest
    assert eval_set_sha256(gatt, records) != digest


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """An empty MLflow store (SQLite file, artifacts beside it) as the tracking URI of this test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LLAMA2_SERVE_CACHE", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().create_experiment(
        "gate-test", artifact_location=(tmp_path / "artifacts").as_uri()))
    yield mlflow
    mlflow.set_tracking_uri(None)


def test_gate_reevaluates_the_champion_on_the_current_eval_set(ray_local, setup, registry):
    """A champion of this profile, registered from a checkpoint no stage evaluated, is downloaded and evaluated on
    today's eval records: the gate's baseline numbers are that evaluation's; with the champion's training run among
    the stages it reuses that stage's answers; a champion of another profile gives way to SFT."""
    from components.rlhf.evaluate import evaluate_prompts, metric_values, promotion_gate
    from components.rlhf.gate import GATED
    from components.track.registry import register_checkpoint

    folder, records, _ = setup
    tok = small_tokenizer()
    champion_ckpt = save_checkpoint(folder / "champion", debug_model(tok.vocab_size, seed=1, max_seq_len=512), tok)
    with registry.start_run():
        register_checkpoint(champion_ckpt, CFG.register.model_name, CFG.register.alias,
                            {"profile": "tiny", "training_run": "run-of-the-old-chat"})
    champ_metrics, champ_samples = evaluate_prompts(champion_ckpt, records, {}, CFG)
    # The candidate and SFT answers as the flow would hold them, scored unlike the random champion's: perfect, half
    perfect = [{**s, "helpfulness": 1.0, "safety": 1.0, "refusal": s["task"] == "harmful"} for s in champ_samples]
    samples = {"chat": perfect, "sft": [{**s, "helpfulness": 0.5} for s in perfect]}

    gate, reevaluated = promotion_gate("chat", samples, {"chat": "run-of-this-chat"}, records, "tiny", CFG)
    assert gate["compared_with"] == "champion" and gate["baseline_version"] == 1
    assert "re-evaluated" in gate["baseline_reason"] and reevaluated == champ_metrics
    for metric in GATED:
        check = gate["metrics"][metric]
        assert check["baseline"] == pytest.approx(champ_metrics[metric]) and check["n"] == champ_metrics[f"{metric}_n"]
        assert check["candidate"] == pytest.approx(sum(metric_values(perfect)[metric]) / check["n"])
    assert gate["metrics"]["helpfulness"]["candidate"] == 1.0 > champ_metrics["helpfulness"]

    same, none = promotion_gate("chat", samples, {"chat": "run-of-the-old-chat"}, records, "tiny", CFG)
    assert none is None and "stage chat's" in same["baseline_reason"] and same["passed"]
    assert all(c["diff"] == 0.0 for c in same["metrics"].values())  # compared with its own answers

    other, none = promotion_gate("chat", samples, {}, records, "ci", CFG)
    assert none is None and other["compared_with"] == "sft" and "profile 'tiny'" in other["baseline_reason"]
    assert other["metrics"]["helpfulness"]["baseline"] == 0.5 and other["baseline_version"] is None
