"""Sampling the policy on Ray Data and the recipes built on it: rejection sampling, Ghost Attention, context
distillation. Selection rules are tested on hand-written results; the sampler runs for real on a local Ray cluster."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from components.cluster import RayConfig
from components.data import oracle
from components.rlhf.reward import init_reward_model, rm_scores
from components.rlhf.sampling import (SampleConfig, adherence_by_turn, choose_reward, gatt_examples, gatt_placements,
                                      gatt_sampling_dialog, gatt_training_dialogs, ghost_attention, mean_scores,
                                      pack_gatt_dialogs, sample, select_best, select_distilled, with_preprompt)
from model.chat import encode_dialog
from model.checkpoint import save_checkpoint
from tests.helpers import debug_model, small_tokenizer

USER = lambda text: {"role": "user", "content": text}  # noqa: E731
RAY = RayConfig(num_workers=1, cpus_per_worker=1)


def test_choose_reward_is_the_piecewise_reward():
    result = {"rm_helpful": [0.9, 0.2, 0.7], "rm_safety": [0.5, 0.6, 0.1]}
    assert choose_reward(result, False, 0.15) == pytest.approx([0.9, 0.2, 0.1])  # 0.1 < 0.15: safety score
    assert choose_reward(result, True, 0.15) == pytest.approx([0.5, 0.6, 0.1])
    assert choose_reward(result, False, 0.05) == pytest.approx([0.9, 0.2, 0.7])  # the threshold is the caller's


def test_select_best_keeps_the_highest_reward_answer_per_prompt():
    records = [{"prompt": [USER("a")], "is_safety": False}, {"prompt": [USER("b")], "is_safety": True}]
    results = [{"answers": ["x", "y", "z"], "rm_helpful": [0.2, 0.9, 0.5], "rm_safety": [0.9, 0.9, 0.9]},
               {"answers": ["p", "q", "r"], "rm_helpful": [0.9, 0.9, 0.9], "rm_safety": [0.3, 0.1, 0.8]}]
    dialogs, stats = select_best(records, results, 0.15)
    assert [d[-1]["content"] for d in dialogs] == ["y", "r"]
    assert dialogs[0][:-1] == records[0]["prompt"] and dialogs[0][-1]["role"] == "assistant"
    assert stats["reward_best"] == pytest.approx((0.9 + 0.8) / 2)
    assert stats["reward_mean"] == pytest.approx((1.6 / 3 + 1.2 / 3) / 2)
    assert stats["reward_median"] == pytest.approx((0.5 + 0.3) / 2)
    assert stats["reward_gain"] > 0 and stats["samples"] == 6
    assert "oracle_pick" not in stats  # prompts the oracle does not know (real data): no diagnostic


def test_select_best_reports_the_oracles_view_of_the_pick_on_world_prompts():
    """The oracle scores the reward models' pick against a random draw and its own best: here the RM picks the
    wrong sum of three, so the pick scores below a random draw and the oracle's best is the right one."""
    sum_ref = json.dumps({"answer": 7})
    records = [{"prompt": [USER("What is 3 + 4?")], "is_safety": False, "task": "arithmetic", "reference": sum_ref},
               {"prompt": [USER("hi")], "is_safety": False, "task": None, "reference": None}]
    results = [{"answers": ["3 + 4 = 7.", "3 + 4 = 9.", "3 + 4 = 12."], "rm_helpful": [0.2, 0.9, 0.5],
                "rm_safety": [0.9, 0.9, 0.9]},
               {"answers": ["a", "b"], "rm_helpful": [0.1, 0.2], "rm_safety": [0.9, 0.9]}]
    _, stats = select_best(records, results, 0.15)
    scores = [oracle.preference_score("helpful", "arithmetic", {"answer": 7}, a) for a in results[0]["answers"]]
    assert scores[0] == 1.0 and scores[1] < 1.0  # the oracle knows the right sum
    assert stats["oracle_prompts"] == 1  # the unknown task is left out
    assert stats["oracle_pick"] == pytest.approx(scores[1]) and stats["oracle_best"] == 1.0
    assert stats["oracle_draw"] == pytest.approx(sum(scores) / 3)
    assert stats["oracle_pick_gain"] < 0


def test_gatt_trains_with_the_instruction_in_one_place_only_and_on_the_answers_that_keep_it():
    a = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    d = {"system": "Be brief.", "users": ["q1", "q2"]}  # the paper's sampling: the instruction in every user turn
    assert gatt_sampling_dialog(d, False) == {"system": "Be brief.", "users": ["q1", "Be brief. q2"]}
    assert gatt_sampling_dialog(d, True) == {"system": "", "users": ["Be brief. q1", "Be brief. q2"]}
    dialogs = [{"system": "Be brief.", "users": ["q1", "q2", "q3"]}, {"system": "Shout.", "users": ["r1", "r2"]}]
    training = gatt_training_dialogs(dialogs, [["a1", "a2"], ["B1", "B2"]], [False, True])
    assert training == [  # as many turns as answers
        [{"role": "system", "content": "Be brief."}, USER("q1"), a("a1"), USER("q2"), a("a2")],
        [USER("Shout. r1"), a("B1"), USER("r2"), a("B2")]]  # the instruction in the first user turn only
    assert gatt_training_dialogs(dialogs[:1], [["a1"]])[0][0]["role"] == "system"  # the default: system prompt
    # Per turn, how many draws kept the instruction: a dialog is cut after its last kept answer and trained on the
    # kept ones only; one with none is left out.
    answers = [["a1", "a2", "a3"], ["B1", "B2"]]
    kept, turns = gatt_examples(dialogs, answers, [[0, 2, 0], [1, 0]], [False, True])
    assert kept == [training[0], training[1][:2]] and turns == [[1], [0]]
    assert gatt_examples(dialogs, answers, [[0, 0, 0], [0, 0]], [False, True]) == ([], [])
    # The dropped first answer stays in the history with no loss: the model learns to keep the instruction after it.
    tok = small_tokenizer()
    enc = encode_dialog(tok, kept[0], turns[0])
    first_answer_end = len(encode_dialog(tok, kept[0][:3]).tokens)
    assert sum(enc.loss_mask[:first_answer_end]) == 0 and sum(enc.loss_mask) > 0


def test_pack_gatt_dialogs_joins_one_instruction_up_to_max_turns():
    d = lambda system, key, users: {"system": system, "instruction": key, "users": users}  # noqa: E731
    dialogs = [d("s1", "a", ["1", "2"]), d("t", "b", ["x"]), d("s2", "a", ["3", "4", "5"]), d("s3", "a", ["6", "7"]),
               d("s4", "a", ["8"] * 7)]
    assert pack_gatt_dialogs(dialogs, 0) == dialogs
    assert pack_gatt_dialogs(dialogs, 6) == [d("s1", "a", ["1", "2", "3", "4", "5"]), d("s3", "a", ["6", "7"]),
                                             d("s4", "a", ["8"] * 7), d("t", "b", ["x"])]  # a longer one stays whole
    assert dialogs[0]["users"] == ["1", "2"]  # the input is not changed


def test_gatt_placements_are_seeded_and_follow_the_fraction():
    placed = gatt_placements(400, 0.3, seed=0)
    assert placed == gatt_placements(400, 0.3, seed=0) and placed != gatt_placements(400, 0.3, seed=1)
    assert 0.2 < sum(placed) / 400 < 0.4
    assert not any(gatt_placements(50, 0.0, 0)) and all(gatt_placements(50, 1.0, 0))


def test_adherence_by_turn_is_the_oracle_check_per_turn():
    answers = [["WELL done", "well, yes", "no"], ["well said"], ["BLUE", "blue fish"]]
    got = adherence_by_turn(["start_well", "start_well", "one_word"], answers, "data_adherence_")
    assert got == pytest.approx({"data_adherence": 4 / 6, "data_adherence_turn1": 1.0, "data_adherence_turn2": 0.5,
                                 "data_adherence_turn3": 0.0})


def test_select_distilled_keeps_safe_answers_that_beat_an_unsafe_plain_answer_by_a_margin():
    prompts = [[USER(f"harm {i}")] for i in range(5)]
    pre = [{"answers": ["safe"], "rm_safety": [0.9]}, {"answers": ["worse"], "rm_safety": [0.05]},
           {"answers": ["close"], "rm_safety": [0.6]}, {"answers": ["unsafe"], "rm_safety": [0.4]},
           {"answers": ["safe too"], "rm_safety": [0.95]}]
    plain = [{"answers": ["x"], "rm_safety": [0.1]}, {"answers": ["y"], "rm_safety": [0.1]},
             {"answers": ["z"], "rm_safety": [0.55]}, {"answers": ["w"], "rm_safety": [0.1]},
             {"answers": ["v"], "rm_safety": [0.2]}]  # the plain answer is already safe enough: left alone
    rule = {"plain_below": 0.6, "min_safety": 0.5, "margin": 0.1}
    dialogs, stats = select_distilled(prompts, pre, plain, **rule)
    # harm 1: worse; harm 2: a gain of 0.05 < margin; harm 3: better by 0.3 but not safe in absolute terms
    assert dialogs == [[USER("harm 0"), {"role": "assistant", "content": "safe"}],  # trained without the preprompt
                       [USER("harm 4"), {"role": "assistant", "content": "safe too"}]]
    assert stats["kept"] == 2 and stats["plain_low"] == 5 and stats["safety_gain_kept"] == pytest.approx(0.775)
    dialogs, stats = select_distilled(prompts, pre, plain, **{**rule, "plain_below": 0.15})
    assert [d[0]["content"] for d in dialogs] == ["harm 0"] and stats["plain_low"] == 3
    # nothing low: nothing kept, and the stats say so
    assert select_distilled(prompts, pre, plain, **{**rule, "plain_below": 0.05})[1]["kept"] == 0
    # k preprompted answers: the safest one competes with the plain answer
    pre_k = [{"answers": ["a", "b"], "rm_safety": [0.3, 0.7]}]
    dialogs, _ = select_distilled(prompts[:1], pre_k, plain[:1], **rule)
    assert dialogs[0][-1]["content"] == "b"
    # ... with the safest of the k plain answers
    plain_k = [{"answers": ["c", "d"], "rm_safety": [0.1, 0.65]}]
    assert select_distilled(prompts[:1], pre_k, plain_k, **rule)[0] == []


def test_with_preprompt_keeps_a_single_system_prompt():
    assert with_preprompt("Be safe.", [USER("q")])[0] == {"role": "system", "content": "Be safe."}
    merged = with_preprompt("Be safe.", [{"role": "system", "content": "Be brief."}, USER("q")])
    assert merged == [{"role": "system", "content": "Be safe. Be brief."}, USER("q")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    tok = small_tokenizer()
    policy = debug_model(vocab_size=tok.vocab_size)
    save_checkpoint(folder / "policy", policy, tok)
    for i, name in enumerate(("rm_helpful", "rm_safety")):
        rm = init_reward_model(policy, head_std=0.5, generator=torch.Generator().manual_seed(i))
        save_checkpoint(folder / name, rm, tok)
    return folder


def test_sample_on_ray_data_answers_k_times_and_scores_against_the_score_prompt(ray_local, checkpoints):
    from model.checkpoint import load_checkpoint

    cfg = SampleConfig(k=3, temperature=1.0, max_new_tokens=6, batch_size=2, seed=1)
    rows = [{"prompt": [USER(f"question {i}")]} for i in range(3)]
    rows.append({"prompt": [{"role": "system", "content": "pre"}, USER("q")], "score_prompt": [USER("q")]})
    rms = {name: checkpoints / name for name in ("rm_helpful", "rm_safety")}
    results = sample(rows, checkpoints / "policy", cfg, RAY, rms)
    assert len(results) == 4 and all(len(r["answers"]) == 3 and len(r["rm_safety"]) == 3 for r in results)
    assert len({a for r in results for a in r["answers"]}) > 3  # sampled, not one answer repeated
    rm, tok = load_checkpoint(checkpoints / "rm_safety")
    last = results[-1]
    expected = rm_scores(rm.eval(), tok, [[USER("q"), {"role": "assistant", "content": a}] for a in last["answers"]],
                         8)
    assert last["rm_safety"] == pytest.approx(expected, abs=2e-2)  # bf16 autocast in both
    assert sample(rows, checkpoints / "policy", cfg, RAY, rms) == results  # seeded: a rerun draws the same


def test_ghost_attention_answers_every_turn_and_trains_the_turns_that_keep_the_instruction(ray_local, checkpoints):
    # One-token answers are one word nearly always: with 8 draws a turn, every turn has one that keeps "one_word".
    one_word = [{"system": "Answer in one word.", "users": ["a", "b", "c"], "instruction": "one_word"},
                {"system": "One word.", "users": ["d"], "instruction": "one_word"}]
    cfg = SampleConfig(k=8, temperature=1.0, max_new_tokens=1)
    for history in (True, False):  # the paper's whole dialogs, or turn by turn
        training, turns, stats = ghost_attention(one_word, checkpoints / "policy", cfg, RAY, history=history)
        assert [len(d) for d in training] == [7, 3] and turns == [[0, 1, 2], [0]]
    assert {k: stats[k] for k in ("dialogs", "examples", "turns_mean", "first_turn_dialogs", "turns_kept",
                                  "turns_trained")} == {
        "dialogs": 2, "examples": 2, "turns_mean": 2.0, "first_turn_dialogs": 0, "turns_kept": 1.0, "turns_trained": 4}
    assert stats["data_adherence_turn1"] == stats["data_adherence_turn3"] == stats["data_adherence_one_word"] == 1.0
    assert 0 < stats["sampled_adherence_turn1"] <= 1
    assert [len(d) for d in training] == [7, 3] and turns == [[0, 1, 2], [0]]
    assert [m["content"] for m in training[0] if m["role"] == "user"] == ["a", "b", "c"]  # no instruction
    assert all(len(m["content"].split()) == 1 for d in training for m in d if m["role"] == "assistant")
    # Every dialog with its instruction in the first user turn: no system prompt anywhere.
    training, turns, stats = ghost_attention(one_word, checkpoints / "policy", cfg, RAY, 1.0)
    assert stats["first_turn_dialogs"] == 2 and [len(d) for d in training] == [6, 2]
    assert training[0][0] == USER("Answer in one word. a") and [m["content"] for m in training[0][2::2]] == ["b", "c"]
    # A debug policy writes no all-uppercase 6-token answer: only turns whose answer keeps the instruction are
    # trained (here: none).
    shout = [{"system": "Shout.", "users": ["d", "e"], "instruction": "uppercase"}]
    training, turns, stats = ghost_attention(shout, checkpoints / "policy", SampleConfig(k=2, max_new_tokens=6), RAY,
                                             history=False, redraws=1)
    assert stats["sampled_adherence_turn1"] == stats["turns_kept"] == 0 and training == turns == []
    with pytest.raises(ValueError, match="redraws"):
        ghost_attention(shout, checkpoints / "policy", cfg, RAY, redraws=1)


def test_a_redraw_replaces_a_turn_only_with_an_answer_that_keeps_the_instruction():
    from components.rlhf.sampling import Sampler

    result = {"answers": []}
    Sampler.keep(result, "one_word", [("two words", -0.1), ("three more words", -0.2)], redrawn=False)
    assert result == {"answers": ["two words"], "adherent": [0], "adherent_first": [0]}
    Sampler.keep(result, "one_word", [("still two", -0.1), ("nope again", -0.3)], redrawn=True)
    assert result["answers"] == ["two words"] and result["adherent"] == [0]  # nothing better: unchanged
    Sampler.keep(result, "one_word", [("yes", -2.0), ("two words", -0.1), ("ok", -0.5)], redrawn=True)
    assert result == {"answers": ["ok"], "adherent": [2], "adherent_first": [0]}  # the likeliest keeping draw


def test_redraws_run_in_the_same_pass_and_draw_first_what_no_redraw_draws(ray_local, checkpoints):
    # Two-token answers of a debug policy are one word only sometimes: some turns need a redraw.
    rows = [{"prompt": [{"role": "system", "content": "One word."}, USER(f"q{i}")], "instruction": "one_word"}
            for i in range(12)]
    cfg = SampleConfig(k=1, temperature=1.0, max_new_tokens=2, batch_size=4, seed=3)
    plain = sample(rows, checkpoints / "policy", cfg, RAY)
    redrawn = sample(rows, checkpoints / "policy", replace(cfg, redraws=4), RAY)
    assert [r["adherent"] for r in plain] == [r["adherent_first"] for r in plain] == [
        r["adherent_first"] for r in redrawn]  # attempt 0 is seeded as without redraws
    kept_plain = [bool(r["adherent"][0]) for r in plain]
    kept = [bool(r["adherent"][0]) for r in redrawn]
    assert 0 < sum(kept_plain) < sum(kept)  # some turns dropped it at first, and a redraw found one that keeps it
    for a, b, first_kept in zip(plain, redrawn, kept_plain):
        if first_kept:  # a turn kept at first is not drawn again
            assert b["answers"] == a["answers"]
        assert oracle.gatt_adherence("one_word", b["answers"][0]) == bool(b["adherent"][0])


def test_mean_scores_are_the_reward_models_on_greedy_answers(ray_local, checkpoints):
    rms = {name: checkpoints / name for name in ("rm_helpful", "rm_safety")}
    prompts = [[USER(f"question {i}")] for i in range(3)]
    got = mean_scores(prompts, checkpoints / "policy", rms, SampleConfig(k=4, temperature=1.0, max_new_tokens=4), RAY)
    greedy = sample([{"prompt": p} for p in prompts], checkpoints / "policy",
                    SampleConfig(k=1, temperature=0.0, max_new_tokens=4), RAY, rms)
    assert got == pytest.approx({n: sum(r[n][0] for r in greedy) / 3 for n in rms})


def test_prompts_without_room_for_the_answer_are_dropped_before_sampling(tmp_path):
    from flows._finetune import SampledFinetuneConfig, fitting_prompts

    tok = small_tokenizer()
    policy = save_checkpoint(tmp_path / "policy", debug_model(vocab_size=tok.vocab_size), tok)  # context 128
    cfg = SampledFinetuneConfig(sample=SampleConfig(max_new_tokens=32))
    short, long = {"prompt": [USER("hello there")]}, {"prompt": [USER("word " * 120)]}
    assert fitting_prompts("rejection", [short, long, short], policy, cfg) == (
        [short, short], {"dropped_too_long": 1, "truncated_too_long": 0})
    with pytest.raises(SystemExit, match="distill: all 1 prompts are longer"):  # measured as the sampler builds it
        fitting_prompts("distill", [short], policy, cfg,
                        lambda r: [{"role": "system", "content": "be safe " * 60}] + r["prompt"])


def test_multi_turn_rows_take_one_answer_a_turn():
    rows = [{"prompt": [USER("a")], "later": [USER("b")]}]
    with pytest.raises(ValueError, match=r"once per turn \(k = 1\), unless they carry a GAtt instruction"):
        sample(rows, "unused", SampleConfig(k=2), RAY)


def test_scores_are_the_reward_models_on_the_sampled_answers_and_the_policy_actor_holds_no_reward_model(
        ray_local, checkpoints):
    from components.rlhf.sampling import Sampler, Scorer
    from model.checkpoint import load_checkpoint

    cfg = SampleConfig(k=2, temperature=1.0, max_new_tokens=5, batch_size=2, seed=3)
    rows = [{"prompt": [USER(f"q{i}")], "score_prompt": [USER(f"plain q{i}")]} for i in range(5)]
    rms = {name: checkpoints / name for name in ("rm_helpful", "rm_safety")}
    results = sample(rows, checkpoints / "policy", cfg, RAY, rms)
    assert [r["answers"] for r in results] == [r["answers"] for r in sample(rows, checkpoints / "policy", cfg, RAY)]
    for name, path in rms.items():
        rm, tok = load_checkpoint(path)
        for start in range(0, len(rows), cfg.batch_size):  # the sampler's jobs: batch_size rows, k answers each
            job = list(zip(rows[start:start + cfg.batch_size], results[start:start + cfg.batch_size]))
            dialogs = [row["score_prompt"] + [{"role": "assistant", "content": a}]
                       for row, r in job for a in r["answers"]]
            assert [s for _, r in job for s in r[name]] == rm_scores(rm, tok, dialogs, cfg.batch_size)
    assert len({s for r in results for s in r["rm_safety"]}) > 5  # distinct scores: a shifted row would show
    sampler = Sampler(cfg, threads=1)
    job = {"task": [0], "policy": [str(checkpoints / "policy")], "start": [0],
           "rows": [json.dumps([{"prompt": rows[0]["prompt"], "later": [], "instruction": None}])]}
    sampler(job)  # the job's policy loads with it
    assert [v for v in vars(sampler).values() if isinstance(v, torch.nn.Module)] == [sampler.model]
    assert sorted(Scorer({k: str(v) for k, v in rms.items()}, cfg, threads=1).rms) == sorted(rms)


def test_gpu_loads_bf16_without_fused_copies_and_cpu_keeps_fp32_with_them(checkpoints, monkeypatch):
    from components.rlhf import sampling

    model, _ = sampling.load_for_inference(str(checkpoints / "policy"), "cpu", bf16=True)
    assert model.tok_embeddings.weight.dtype == torch.float32 and model.kernels.cache_weights
    real = sampling.load_checkpoint  # a "cuda" load, made on the CPU: the branch, not the device, is under test
    monkeypatch.setattr(sampling, "load_checkpoint", lambda path, device, dtype=None: real(path, "cpu", dtype))
    model, _ = sampling.load_for_inference(str(checkpoints / "policy"), "cuda", bf16=True)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 and not model.kernels.cache_weights
    model, _ = sampling.load_for_inference(str(checkpoints / "policy"), "cuda", bf16=False)  # evaluation: fp32
    assert model.tok_embeddings.weight.dtype == torch.float32 and not model.kernels.cache_weights


def test_fit_prompt_drops_the_oldest_turns_and_keeps_the_system_prompt():
    """eval_gatt's 6-turn dialogs outgrow the tiny model's context: the oldest turns go, the instruction stays."""
    from components.rlhf.sampling import fit_prompt
    from model.chat import encode_prompt

    tok = small_tokenizer()
    dialog = [{"role": "system", "content": "Always answer in uppercase."}]
    for i in range(6):
        dialog += [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{i + i}"}]
    dialog = dialog[:-1]  # ends with the 6th user turn
    full = encode_prompt(tok, dialog)
    assert fit_prompt(tok, dialog, len(full)) == full  # fits: unchanged
    cut = fit_prompt(tok, dialog, len(full) - 1)
    assert cut == encode_prompt(tok, dialog[:1] + dialog[3:])  # one user/assistant pair dropped
    assert tok.decode(cut).count("uppercase") == 1 and "5 + 5" in tok.decode(cut)
    last = fit_prompt(tok, dialog, 1)  # nothing fits: the system prompt and the last user turn are left
    assert last == encode_prompt(tok, dialog[:1] + dialog[-1:])
