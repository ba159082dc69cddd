"""Evaluate every model stage on held-out prompts: the oracle's helpfulness, refusal rate on harmful prompts,
false-refusal rate on benign look-alikes, Ghost Attention adherence by turn, and both reward models' mean scores.

The answers come from the sampler's Ray Data actor pool (components/rlhf/sampling.py), greedy and in fp32; the
oracle scores them here, in the driver (plain Python, cheap)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from components.cluster import RayConfig
from components.data import oracle
from components.rlhf.gate import PromotionConfig, choose_baseline, decide
from components.rlhf.sampling import SampleConfig, sample_many, table_dialogs, turn_rows
from components.rlhf.stats import mean_summary, rate_summary


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


# Metrics that are rates of 0/1 outcomes (Wilson intervals); every other metric is a mean score (bootstrap).
RATES = ("safety", "refusal_rate_harmful", "false_refusal_rate")


def metric_values(samples: list[dict], column: str | None = None) -> dict[str, list]:
    """Per metric, the per-answer values it averages, in sample order: helpfulness over every task but harmful
    (refusing is the helpful answer there), refusal rate over harmful prompts, false refusal rate over benign
    look-alikes, safety over all, helpfulness_<task> per task. Two models' lists over the same prompts pair up.
    column: that field of each sample instead of its value (e.g. "item": the held-out item each value measures)."""
    values = {"helpfulness": [], "safety": [], "refusal_rate_harmful": [], "false_refusal_rate": []}
    get = (lambda s, field: s[column]) if column else (lambda s, field: float(s[field]))  # noqa: E731
    for s in samples:
        task = s["task"]
        if task != "harmful":
            values["helpfulness"].append(get(s, "helpfulness"))
        values["safety"].append(get(s, "safety"))
        if task == "harmful":
            values["refusal_rate_harmful"].append(get(s, "refusal"))
        if task == "benign_lookalike":
            values["false_refusal_rate"].append(get(s, "refusal"))
        values.setdefault(f"helpfulness_{task}", []).append(get(s, "helpfulness"))
    return values


def summarize(values: dict[str, list[float]], items: dict[str, list[str]] | None = None) -> dict:
    """Each metric's value with its n and 95% interval: <m>, <m>_n, <m>_ci95 = [lo, hi]; items (metric_values(...,
    "item")): the intervals clustered by held-out item (components/rlhf/stats.py), and <m>_items."""
    metrics = {}
    for name, xs in values.items():
        groups = items[name] if items else None
        metrics.update(rate_summary(name, xs, groups) if name in RATES else mean_summary(name, xs, groups=groups))
    return metrics


def score_answers(records: list[dict], prompts: list[list[dict]], responses: list[str]) -> tuple[dict, list[dict]]:
    """The oracle's metrics (with n and 95% intervals clustered by item) over answers to eval_prompts records, and
    one sample row per answer."""
    samples = [{"task": record["task"], "item": record.get("item") or prompt[-1]["content"],
                "prompt": prompt[-1]["content"], "response": response, **oracle.score(record, response)}
               for record, prompt, response in zip(records, prompts, responses, strict=True)]
    return summarize(metric_values(samples), metric_values(samples, "item")), samples


def evaluate_prompts(checkpoint, records: list[dict], reward_models: dict, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """Greedy answers to eval_prompts records, scored by the oracle and by each reward model (mean sigmoid score)."""
    return evaluate_checkpoint(checkpoint, records, [], reward_models, cfg)


GATT_TARGET_TURNS = (2, 3, 4)  # the turns the GAtt target is set on; per instruction, they are pooled


def gatt_metrics(dialogs: list[dict], answers: list[list[str]]) -> dict:
    """Per turn (as many as the longest dialog has), the fraction of the model's answers to multi-turn eval_gatt
    dialogs (its own answers kept in the history) that follow the system instruction, with its n and Wilson
    interval; and per instruction, the same over turns 2-4 (gatt_<instruction>: which instructions hold)."""
    out = {}
    for turn in range(max(len(a) for a in answers)):
        hits = [oracle.gatt_adherence(d["instruction"], a[turn]) for d, a in zip(dialogs, answers) if turn < len(a)]
        out.update(rate_summary(f"gatt_turn{turn + 1}", hits))
    for instruction in sorted({d["instruction"] for d in dialogs}):
        turns = [(i, a[t - 1]) for i, (d, a) in enumerate(zip(dialogs, answers))
                 if d["instruction"] == instruction for t in GATT_TARGET_TURNS if t <= len(a)]
        if turns:  # a dialog's turns are alike: the interval is clustered by dialog
            out.update(rate_summary(f"gatt_{instruction}", [oracle.gatt_adherence(instruction, a) for _, a in turns],
                                    [i for i, _ in turns]))
    return out


def eval_set_sha256(records: list[dict], gatt_dialogs: list[dict]) -> str:
    """sha256 of the eval set: the eval_prompts and eval_gatt rows, in order, as canonical JSON (sorted keys)."""
    digest = hashlib.sha256()
    for table, rows in (("eval_prompts", records), ("eval_gatt", gatt_dialogs)):
        digest.update(f"{table}\n".encode())
        for row in rows:
            digest.update(json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                     default=str).encode() + b"\n")
    return digest.hexdigest()


def evaluate_checkpoints(checkpoints: dict[str, str | Path], eval_records: list[dict], gatt_dialogs: list[dict],
                         reward_models: dict[str, str | Path], cfg: EvalConfig) -> dict[str, tuple[dict, list[dict]]]:
    """Each model stage's metrics and answer samples ({name: checkpoint folder} -> {name: (metrics, samples)}), all
    from one Ray Data pass (sample_many): the models load in cfg.ray's actors one after the other, the reward models
    (name -> checkpoint folder) once, never in the caller. gatt_dialogs may be empty (no GAtt metrics)."""
    prompts = [json.loads(r["prompt"]) for r in eval_records]
    tasks = [(ckpt, [{"prompt": p} for p in prompts]) for ckpt in checkpoints.values()]
    if gatt_dialogs:  # answered plainly (no instruction check), and not scored: multi-turn rows
        plain = turn_rows([{**d, "instruction": None} for d in table_dialogs(gatt_dialogs)])
        tasks += [(ckpt, plain) for ckpt in checkpoints.values()]
    results = sample_many(tasks, cfg.sampling(), cfg.ray, reward_models)
    out = {}
    for i, name in enumerate(checkpoints):
        metrics, samples = score_answers(eval_records, prompts, [r["answers"][0] for r in results[i]])
        for rm in reward_models:
            metrics.update(mean_summary(f"{rm}_score", [r[rm][0] for r in results[i]]))
        if gatt_dialogs:
            metrics.update(gatt_metrics(gatt_dialogs, [r["answers"] for r in results[len(checkpoints) + i]]))
        out[name] = metrics, samples
    return out


def evaluate_checkpoint(checkpoint: str | Path, eval_records: list[dict], gatt_dialogs: list[dict],
                        reward_models: dict[str, str | Path], cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """One model stage's metrics and answer samples (evaluate_checkpoints)."""
    return evaluate_checkpoints({"model": checkpoint}, eval_records, gatt_dialogs, reward_models, cfg)["model"]


def promotion_gate(candidate: str, samples: dict[str, list[dict]], run_ids: dict[str, str], records: list[dict],
                   profile: str, cfg: EvalConfig) -> tuple[dict, dict | None]:
    """The gate's decision (components/rlhf/gate.py) on the candidate stage's answers, against the champion of the
    same profile re-evaluated on these eval records, or else the SFT stage. samples: model stage -> its answer
    samples on `records`; run_ids: model stage -> the run id of the stage that trained its checkpoint (a champion
    registered from one of these checkpoints is not evaluated twice). Returns (decision as a dict, the champion's
    metrics when it was re-evaluated here, else None). Needs the MLflow tracking URI set."""
    from components.serve.resolve import resolve_checkpoint
    from components.track.registry import champion_version

    reg = cfg.register
    champion = champion_version(reg.model_name, reg.alias)
    compared_with, reason = choose_baseline(champion, profile)
    champion_metrics = None
    if compared_with == "sft":
        baseline = samples["sft"]
    elif same := [s for s, run in run_ids.items() if run and run == champion["tags"].get("training_run")]:
        baseline = samples[same[0]]
        reason += f"; its checkpoint is stage {same[0]}'s, evaluated above on this eval set"
    else:
        checkpoint = resolve_checkpoint(f"models:/{reg.model_name}/{champion['version']}")
        champion_metrics, baseline = evaluate_prompts(checkpoint, records, {}, cfg)
        reason += "; re-evaluated on this eval set"
    if [s["prompt"] for s in baseline] != [s["prompt"] for s in samples[candidate]]:
        raise ValueError("gate: the baseline's answers are not to the candidate's eval prompts")
    decision = decide(candidate, metric_values(samples[candidate]), compared_with, metric_values(baseline),
                      reg.tolerance, reason, metric_values(samples[candidate], "item")).to_dict()
    decision["baseline_version"] = champion["version"] if compared_with == "champion" else None
    return decision, champion_metrics
