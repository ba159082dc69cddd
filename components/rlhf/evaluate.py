"""Evaluate every model stage on held-out prompts: the oracle's helpfulness, refusal rate on harmful prompts,
false-refusal rate on benign look-alikes, Ghost Attention adherence by turn, and both reward models' mean scores."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from components.data import oracle
from components.rlhf.gate import PromotionConfig
from components.rlhf.reward import rm_scores
from model.chat import encode_prompt
from model.checkpoint import load_checkpoint
from model.generation import SamplingParams, generate


@dataclass(frozen=True)
class EvalConfig:
    """params `evaluate`, with `register` (the gate that decides on the result)."""

    max_new_tokens: int = 32  # greedy answers
    batch_size: int = 64  # prompts per generate() call
    register: PromotionConfig = PromotionConfig()


def _generate_texts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    texts = []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    for start in range(0, len(prompts), batch_size):
        out = generate(model, prompts[start:start + batch_size], params, tokenizer.eos_id, tokenizer.pad_id)
        texts += [tokenizer.decode(t).strip() for t in out.tokens]
    return texts


def evaluate_prompts(model, tokenizer, records: list[dict], reward_models: dict, max_new_tokens: int,
                     batch_size: int) -> tuple[dict, list[dict]]:
    prompts = [json.loads(r["prompt"]) for r in records]
    responses = _generate_texts(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens,
                                batch_size)
    by_task = defaultdict(list)
    samples = []
    for record, response in zip(records, responses):
        scores = oracle.score(record, response)
        by_task[record["task"]].append(scores)
        samples.append({"task": record["task"], "prompt": prompts[len(samples)][-1]["content"], "response": response,
                        **scores})
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    metrics = {
        "helpfulness": mean([s["helpfulness"] for t, rows in by_task.items() if t != "harmful" for s in rows]),
        "safety": mean([s["safety"] for rows in by_task.values() for s in rows]),
        "refusal_rate_harmful": mean([float(s["refusal"]) for s in by_task.get("harmful", [])]),
        "false_refusal_rate": mean([float(s["refusal"]) for s in by_task.get("benign_lookalike", [])]),
    }
    metrics.update({f"helpfulness_{t}": mean([s["helpfulness"] for s in rows]) for t, rows in by_task.items()})
    dialogs = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
    for name, rm in reward_models.items():
        scores = rm_scores(rm, tokenizer, dialogs, batch_size)
        metrics[f"{name}_score"] = sum(scores) / len(scores)
    return metrics, samples


def gatt_adherence_by_turn(model, tokenizer, dialogs: list[dict], max_new_tokens: int, batch_size: int) -> dict:
    """Multi-turn dialogs with a system instruction: the model answers turn after turn (its own answers kept in the
    history); the fraction of answers that follow the instruction, per turn."""
    histories = [[{"role": "system", "content": d["system"]}] for d in dialogs]
    user_turns = [[m["content"] for m in json.loads(d["messages"]) if m["role"] == "user"] for d in dialogs]
    by_turn = {}
    for turn in range(max(len(u) for u in user_turns)):
        active = [i for i, u in enumerate(user_turns) if turn < len(u)]
        for i in active:
            histories[i].append({"role": "user", "content": user_turns[i][turn]})
        answers = _generate_texts(model, tokenizer, [encode_prompt(tokenizer, histories[i]) for i in active],
                                  max_new_tokens, batch_size)
        hits = []
        for i, answer in zip(active, answers):
            histories[i].append({"role": "assistant", "content": answer})
            hits.append(oracle.gatt_adherence(dialogs[i]["instruction"], answer))
        by_turn[f"gatt_turn{turn + 1}"] = sum(hits) / len(hits)
    return by_turn


def evaluate_checkpoint(checkpoint: str | Path, eval_records: list[dict], gatt_dialogs: list[dict],
                        reward_models: dict, max_new_tokens: int, batch_size: int) -> tuple[dict, list[dict]]:
    model, tokenizer = load_checkpoint(checkpoint)
    metrics, samples = evaluate_prompts(model, tokenizer, eval_records, reward_models, max_new_tokens, batch_size)
    metrics.update(gatt_adherence_by_turn(model, tokenizer, gatt_dialogs, max_new_tokens, batch_size))
    return metrics, samples
