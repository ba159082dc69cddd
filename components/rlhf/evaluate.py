"""Evaluate every model stage on held-out prompts: the oracle's helpfulness, refusal rate on harmful prompts,
false-refusal rate on benign look-alikes, Ghost Attention adherence by turn, and both reward models' mean scores.

The answers come from the sampler's Ray Data actor pool (components/rlhf/sampling.py), greedy and in fp32; the
oracle scores them here, in the driver (plain Python, cheap)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from components.cluster import RayConfig
from components.data import oracle
from components.rlhf.gate import PromotionConfig
from components.rlhf.sampling import SampleConfig, answer_turns, sample


@dataclass(frozen=True)
class EvalConfig:
    """params `evaluate`, with `register` (the gate that decides on the result)."""

    max_new_tokens: int = 32  # greedy answers
    batch_size: int = 64  # prompts per generate() call
    # bf16 weights and autocast where the device computes bf16 (on GPU the scale profiles need it: two fp32 13B reward
    # models alone are 97 GiB); false keeps fp32, whose numbers stay comparable across devices
    bf16: bool = False
    register: PromotionConfig = PromotionConfig()
    ray: RayConfig = RayConfig()  # the sampler actors: num_workers of them, use_gpu, cpus_per_worker threads each

    def sampling(self) -> SampleConfig:
        """Greedy, one answer per prompt, in fp32 unless bf16."""
        return SampleConfig(k=1, temperature=0.0, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                            bf16=self.bf16)


def score_answers(records: list[dict], prompts: list[list[dict]], responses: list[str]) -> tuple[dict, list[dict]]:
    """The oracle's metrics over answers to eval_prompts records, and one sample row per answer."""
    by_task = defaultdict(list)
    samples = []
    for record, prompt, response in zip(records, prompts, responses, strict=True):
        scores = oracle.score(record, response)
        by_task[record["task"]].append(scores)
        samples.append({"task": record["task"], "prompt": prompt[-1]["content"], "response": response, **scores})
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    metrics = {
        "helpfulness": mean([s["helpfulness"] for t, rows in by_task.items() if t != "harmful" for s in rows]),
        "safety": mean([s["safety"] for rows in by_task.values() for s in rows]),
        "refusal_rate_harmful": mean([float(s["refusal"]) for s in by_task.get("harmful", [])]),
        "false_refusal_rate": mean([float(s["refusal"]) for s in by_task.get("benign_lookalike", [])]),
    }
    metrics.update({f"helpfulness_{t}": mean([s["helpfulness"] for s in rows]) for t, rows in by_task.items()})
    return metrics, samples


def evaluate_prompts(checkpoint, records: list[dict], reward_models: dict, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """Greedy answers to eval_prompts records, scored by the oracle and by each reward model (mean sigmoid score)."""
    prompts = [json.loads(r["prompt"]) for r in records]
    results = sample([{"prompt": p} for p in prompts], checkpoint, cfg.sampling(), cfg.ray, reward_models)
    metrics, samples = score_answers(records, prompts, [r["answers"][0] for r in results])
    for name in reward_models:
        scores = [r[name][0] for r in results]
        metrics[f"{name}_score"] = sum(scores) / len(scores)
    return metrics, samples


def gatt_adherence_by_turn(checkpoint, dialogs: list[dict], cfg: EvalConfig) -> dict:
    """Multi-turn eval_gatt dialogs with a system instruction: the model answers turn after turn (its own answers kept
    in the history); the fraction of answers that follow the instruction, per turn."""
    turns = [{"system": d["system"], "users": [m["content"] for m in json.loads(d["messages"]) if m["role"] == "user"]}
             for d in dialogs]
    answers = answer_turns(turns, checkpoint, cfg.sampling(), cfg.ray)
    by_turn = {}
    for turn in range(max(len(a) for a in answers)):
        hits = [oracle.gatt_adherence(d["instruction"], a[turn]) for d, a in zip(dialogs, answers) if turn < len(a)]
        by_turn[f"gatt_turn{turn + 1}"] = sum(hits) / len(hits)
    return by_turn


def evaluate_checkpoint(checkpoint: str | Path, eval_records: list[dict], gatt_dialogs: list[dict],
                        reward_models: dict[str, str | Path], cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """One model stage's metrics and answer samples; reward_models: name -> checkpoint folder. The models load in
    cfg.ray's Ray Data actors, never in the caller."""
    metrics, samples = evaluate_prompts(checkpoint, eval_records, reward_models, cfg)
    metrics.update(gatt_adherence_by_turn(checkpoint, gatt_dialogs, cfg))
    return metrics, samples
