"""What bounds rejection sampling's gain (README Status: the helpfulness target). A round's policy answers prompts k
times as rejection@<round> samples (params rejection.sample); the round's reward models score every answer (R_c, the
pick rejection sampling makes) and the oracle scores them too (a diagnostic only: no stage trains on it). Per task:
the oracle's helpfulness of the greedy answer, of a random draw (the mean over the k), of the reward models' pick and
of the oracle's own best of k (the headroom), with the pick's gain over a random draw and its 95% interval (paired,
clustered by item). Fine-tuning on the picks can only move the policy toward them: a pick no better than a random
draw teaches nothing; a pick below the greedy answer teaches the policy to be worse than itself.
Training rl_prompts (what the round samples from) and held-out eval prompts (what evaluate scores). Run after the
pipeline, from the repo root: `python benchmarks/diag_rejection.py r1` (the round; its policy from params.yaml)."""
import json
import random
import sys
from dataclasses import replace

from components.cluster import RayConfig
from components.data import oracle
from components.data.datasets import read_table
from components.rlhf.reward import resolve_safety_threshold
from components.rlhf.sampling import SampleConfig, choose_reward, oracle_view, sample
from components.rlhf.stats import paired_bootstrap_diff
from flows._stage import load_params, rlhf_round

PER_TASK = 60  # prompts per task and set: ~4 minutes for both sets at k = 8 on 2 cores


def drawn(rows: list[dict]) -> list[dict]:
    """Up to PER_TASK rows of each task the oracle scores (seeded)."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        if r["task"] in oracle.TASKS:
            by_task.setdefault(r["task"], []).append(r)
    return [r for task in sorted(by_task) for r in random.Random(f"diag/{task}").sample(
        by_task[task], min(PER_TASK, len(by_task[task])))]


def main(round_name: str) -> None:
    params = load_params()
    policy, _ = rlhf_round(params, round_name)
    reward_models = {kind: f"checkpoints/{round_name}/{kind}" for kind in ("rm_helpful", "rm_safety")}
    threshold = resolve_safety_threshold(params["rlhf"]["safety_threshold"], reward_models["rm_safety"])
    cfg = SampleConfig(**{k: v for k, v in params["rejection"]["sample"].items() if k != "prompts"})
    ray_cfg = RayConfig(local_num_cpus=2)
    print(f"policy {policy}, reward models of {round_name}, k = {cfg.k}, temperature {cfg.temperature}, "
          f"safety threshold {threshold:.2f}\n")
    print("| prompts | task | n (items) | greedy | random draw | RM pick | oracle best of k | pick - draw [95%] |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for label, table in (("train", "rl_prompts"), ("held-out", "eval_prompts")):
        rows = drawn(read_table(f"data/raw/{table}.parquet").to_pylist())
        prompts = [{"prompt": json.loads(r["prompt"])} for r in rows]
        greedy = sample(prompts, policy, replace(cfg, k=1, temperature=0.0), ray_cfg)
        drawn_k = sample(prompts, policy, cfg, ray_cfg, reward_models)
        by_task: dict[str, list] = {}
        for r, g, d in zip(rows, greedy, drawn_k, strict=True):
            rewards = choose_reward(d, bool(r["is_safety"]), threshold)
            pick = max(range(len(rewards)), key=rewards.__getitem__)
            by_task.setdefault(r["task"], []).append(
                (r["item"], oracle_view(r, g["answers"], 0)[0], *oracle_view(r, d["answers"], pick)))
        for task, values in by_task.items():
            items, greedy_s, pick_s, mean_s, best_s = zip(*values)
            diff, (lo, hi) = paired_bootstrap_diff(pick_s, mean_s, groups=list(items))
            avg = lambda xs: sum(xs) / len(xs)  # noqa: E731
            print(f"| {label} | {task} | {len(values)} ({len(set(items))}) | {avg(greedy_s):.2f} | {avg(mean_s):.2f} "
                  f"| {avg(pick_s):.2f} | {avg(best_s):.2f} | {diff:+.2f} [{lo:+.2f}, {hi:+.2f}] |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "r1")
