"""Iterative RLHF's pieces without a cluster: the oracle as annotator of the policy's answer pairs
(components/rlhf/annotate.py), pooling across rounds, and params rlhf.rounds (flows/_stage.py)."""

from __future__ import annotations

import copy
import json

import pytest

from components.common import REPO_ROOT, load_yaml
from components.data.oracle import REFUSAL, preference_score
from components.rlhf.annotate import SCHEMA, annotate, comparisons, counts, draw_prompts, pooled
from flows._stage import files_name, final_round, rlhf_round, rlhf_rounds, stage_config

ARITH = {"prompt": json.dumps([{"role": "user", "content": "What is 2 plus 3?"}]), "task": "arithmetic",
         "reference": json.dumps({"expected": "5", "answer": 5}), "item": "sum/2/3", "is_safety": False}
HARM = {"prompt": json.dumps([{"role": "user", "content": "How do I make a weapon at home?"}]), "task": "harmful",
        "reference": json.dumps({"expected": REFUSAL, "topic": "a weapon"}), "item": "harm/weapon", "is_safety": True}


def params() -> dict:
    return load_yaml((REPO_ROOT / "infra/profiles/tiny.yaml").read_text())


def test_the_oracle_orders_each_pair_rates_its_gap_and_drops_ties():
    rows = annotate([ARITH, ARITH, HARM, HARM], [["The answer is 7.", "5"], ["5", "5"], ["I can't", REFUSAL],
                                                 ["Sure, here is how.", REFUSAL]], "r1")
    helpful, safety = rows["helpful"], rows["safety"]
    # One helpful pair: identical draws are one answer (no comparison); no harmful prompt makes a helpful pair.
    assert len(helpful) == 1 and not any(r["task"] == "harmful" for r in helpful)
    assert helpful[0]["chosen"] == "5" and helpful[0]["rejected"] == "The answer is 7."
    # Harmful prompts make safety pairs only; the full refusal beats the truncated one and the compliance.
    assert [r["chosen"] for r in safety] == [REFUSAL, REFUSAL] and [r["rejected"] for r in safety] == [
        "I can't", "Sure, here is how."]
    for row in helpful + safety:
        kind = "helpful" if row in helpful else "safety"
        reference = json.loads(row["reference"])
        gap = (preference_score(kind, row["task"], reference, row["chosen"])
               - preference_score(kind, row["task"], reference, row["rejected"]))
        assert gap > 0 and row["round"] == "r1" and row["item"] in ("sum/2/3", "harm/weapon")
    assert safety[1]["rating"] == "significantly_better"  # unsafe vs safe and helpful: the largest gap
    stats = counts(rows, {"helpful": 2, "safety": 2}, "r1")
    assert stats["helpful_pairs"] == 1 and stats["helpful_ties"] == 1 and stats["safety_pairs"] == 2
    assert sum(stats[f"safety_{r}"] for r in ("significantly_better", "better", "slightly_better",
                                                 "negligibly_better")) == 2


def test_benign_lookalikes_make_both_kinds_and_rows_fit_the_schema():
    lookalike = {**ARITH, "task": "benign_lookalike", "item": "look/kill",
                 "reference": json.dumps({"expected": "Use kill -9 on the process.",
                                                   "keywords": ["kill", "process"]})}
    rows = annotate([lookalike], [["Use kill -9 on the process.", REFUSAL]], "r2")
    assert len(rows["helpful"]) == len(rows["safety"]) == 1  # refusing a look-alike is worse on both
    table = pooled(None, rows["safety"])
    assert table.schema == SCHEMA and table.column("round").to_pylist() == ["r2"]


def test_a_round_pools_the_previous_rounds_pairs():
    first = pooled(None, annotate([HARM], [["Sure.", REFUSAL]], "r1")["safety"])
    second = pooled(first, annotate([HARM, HARM], [["I can't", REFUSAL], [REFUSAL, "I won't."]], "r2")["safety"])
    assert second.column("round").to_pylist() == ["r1", "r2"]  # earlier rounds first; r2's tie (two refusals) dropped
    stats = counts({"safety": second.to_pylist(), "helpful": []}, {"safety": 2, "helpful": 0}, "r2")
    assert stats["safety_pairs"] == 1 and stats["safety_pooled"] == 2 and stats["safety_ties"] == 1


def test_prompts_are_drawn_per_round_and_only_where_the_oracle_can_judge():
    rows = [{**ARITH, "item": str(i)} for i in range(50)] + [{**ARITH, "task": "real"}]
    r1, again, r2 = (draw_prompts(rows, 10, name) for name in ("r1", "r1", "r2"))
    assert r1 == again and r1 != r2 and len(r1) == 10 and all(r["task"] == "arithmetic" for r in r1)
    assert len(draw_prompts(rows, 0, "r1")) == 50


def test_more_answers_a_prompt_are_a_ranking_every_two_of_which_is_a_pair():
    answers = ["5", "2 + 3 = 5.", "The answer is 7.", "5", "I don't know."]  # "5" twice: one answer
    assert len(comparisons(answers)) == 6
    rows = annotate([ARITH], [answers], "r1")["helpful"]
    pairs = {(r["chosen"], r["rejected"]) for r in rows}
    assert len(pairs) == len(rows)  # no comparison twice
    for chosen, rejected in pairs:
        reference = json.loads(ARITH["reference"])
        assert (preference_score("helpful", "arithmetic", reference, chosen)
                > preference_score("helpful", "arithmetic", reference, rejected))
    wrong = {"The answer is 7.", "I don't know."}
    assert {(c, r) for c, r in pairs if r in wrong and c not in wrong} == {
        (c, r) for c in ("5", "2 + 3 = 5.") for r in wrong}  # each right answer beats each wrong one


def test_rounds_in_order_final_checked_and_a_bad_spec_is_a_clear_error():
    p = params()
    assert rlhf_rounds(p) == {"r1": "checkpoints/sft", "r2": "checkpoints/r1/ppo"} and final_round(p) == "r2"
    policy, earlier = rlhf_round(p, "r2")
    assert policy == REPO_ROOT / "checkpoints/r1/ppo" and earlier == ["r1"]
    assert rlhf_round(p, "r1")[1] == []
    with pytest.raises(SystemExit, match=r"no round 'r3' in params rlhf.rounds \(r1, r2\)"):
        rlhf_round(p, "r3")
    broken = [  # what to change -> the message
        ("final", "r1", r"rlhf.final is 'r1'; it must be the last round of rlhf.rounds \('r2'\)"),
        ("rounds", {}, r"rlhf.rounds must map round names"),
        ("rounds", ["r1"], r"rlhf.rounds must map round names"),
        ("rounds", {"r1": "checkpoints/sft"}, r"rlhf.rounds.r1 must be \{policy: <checkpoint folder>\}"),
        ("rounds", {"r1": {"policy": "checkpoints/sft", "lr": 1}}, r"rlhf.rounds.r1 must be"),
        ("rounds", {"round 1": {"policy": "checkpoints/sft"}}, r"round name 'round 1' must be a plain identifier"),
    ]
    for key, value, message in broken:
        bad = copy.deepcopy(p)
        bad["rlhf"][key] = value
        with pytest.raises(SystemExit, match=message):
            rlhf_rounds(bad)


def test_rounds_are_not_config_fields_of_the_stages_that_read_rlhf():
    from components.train.ppo import PPOStageConfig

    assert stage_config(params(), "ppo", PPOStageConfig, flat=("rlhf",)).safety_threshold == 0.15
    assert files_name("ppo@r2") == "r2/ppo" and files_name("gatt") == "gatt"


def test_a_rounds_stage_instance_has_its_dvc_paths_and_its_place_in_the_pipeline():
    """MLflow's dvc.dep.* tags and `make run`'s wall-time table see prefs@r2 etc. as DVC resolves them."""
    from components.track.tracking import _stage_paths, pipeline_order

    deps, outs = _stage_paths("rm_safety@r2")
    assert {"checkpoints/r1/ppo", "data/rounds/r2/prefs_safety.parquet", "flows/_rm.py"} <= set(deps)
    assert outs == ["checkpoints/r2/rm_safety", "plots/curves/r2/rm_safety.json", "plots/curves/r2/rm_safety_val.json"]
    assert "checkpoints/r2/ppo" in _stage_paths("gatt")[0]
    order = pipeline_order()
    assert order[order.index("sft") + 1:order.index("gatt")] == [
        f"{stage}@{r}" for r in ("r1", "r2") for stage in ("prefs", "rm_helpful", "rm_safety", "rejection", "ppo")]


def test_curves_split_held_out_metrics_and_give_every_row_the_same_keys():
    """DVC drops a plots file whose rows differ in keys (PPO's held-out reward on some iterations hid all three PPO
    plots of the tiny profile), so every row carries every key of its file, null where a step has none."""
    from flows._stage import curves

    history = [{"step": 0, "reward": 0.1, "kl": 0.0, "heldout_reward_start": 0.5},
               {"step": 1, "reward": 0.2, "kl": 0.1},
               {"step": 2, "reward": 0.3, "kl": 0.1, "heldout_reward": 0.6},
               {"step": 2, "val_accuracy": 0.7}, {"train_loss": 1.0}]
    train, val = curves(history)
    assert [r["step"] for r in train] == [0, 1, 2, 4] and [r["step"] for r in val] == [0, 2, 2]
    for rows in (train, val):
        assert len({tuple(r) for r in rows}) == 1  # the same keys, in the same order
    assert train[1] == {"step": 1, "reward": 0.2, "kl": 0.1, "train_loss": None}
    assert val[1] == {"step": 2, "heldout_reward_start": None, "heldout_reward": 0.6, "val_accuracy": None}
    assert not any(k.startswith(("val_", "heldout_")) for k in train[0])
