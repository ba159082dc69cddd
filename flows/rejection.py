"""DVC stage `rejection@<round>`: rejection-sampling fine-tuning (§3.2.3): k answers per RL prompt (a draw of
rejection.sample.prompts, new each round) from the round's policy, the best by the round's reward models kept
(-> data/rounds/<round>/rs_samples.jsonl), then fine-tuned on with the SFT loss together with the kept samples of
every earlier round (the paper pools the best samples of all iterations) (Ray Data sampling, Ray Train)
-> checkpoints/<round>/rs/.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace

from components.data.datasets import read_table, too_long_policy
from components.rlhf.reward import resolve_safety_threshold
from components.rlhf.sampling import rejection_sampling
from components.track.tracking import stage_run
from flows._finetune import RejectionConfig, finetune, fitting_prompts
from flows._stage import load_params, path, rlhf_round, round_arg, run_stage, stage_config


def samples_file(name: str):
    return path(f"data/rounds/{name}/rs_samples.jsonl")


def main() -> None:
    name = round_arg()
    params = load_params()
    policy, earlier = rlhf_round(params, name)
    reward_models = {kind: path(f"checkpoints/{name}/{kind}") for kind in ("rm_helpful", "rm_safety")}
    too_long = too_long_policy(params["data"])  # checked before anything runs
    cfg = stage_config(params, "rejection", RejectionConfig, flat=("rlhf",))
    cfg = replace(cfg, safety_threshold=resolve_safety_threshold(cfg.safety_threshold,  # "auto": a number
                                                                 reward_models["rm_safety"]))
    stage, out = f"rejection@{name}", path(f"checkpoints/{name}/rs")
    with stage_run(stage, asdict(cfg), params["profile"], [policy, *reward_models.values(), path("data/raw")],
                   out) as run:
        rows = read_table(path("data/raw/rl_prompts.parquet")).to_pylist()
        if cfg.sample.prompts:  # a draw of its own each round (seeded by the round): rounds ask different prompts
            rows = random.Random(f"{cfg.sample.seed}/rejection/{name}").sample(rows, min(cfg.sample.prompts,
                                                                                       len(rows)))
        records = [{"prompt": json.loads(r["prompt"]), **{k: r.get(k) for k in ("is_safety", "task", "reference")}}
                   for r in rows]  # task and reference: the oracle's diagnostic of the pick (select_best)
        records, counts = fitting_prompts(stage, records, policy, cfg)
        dialogs, stats = rejection_sampling(records, policy, reward_models, cfg.sample, cfg.ray, cfg.safety_threshold)
        write_jsonl(samples_file(name), dialogs)
        pooled = [json.loads(line) for r in earlier for line in samples_file(r).read_text().splitlines()]
        stats.update(counts, earlier_round_samples=len(pooled))
        print(f"[{stage}] {stats}")
        finetune(stage, cfg, policy, dialogs + pooled, out, run.info.run_id, too_long, extra_metrics=stats)


def write_jsonl(file, dialogs: list[list[dict]]) -> None:
    """Atomically: a killed stage leaves no half file for the next round to pool."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text("".join(json.dumps(d) + "\n" for d in dialogs))
    tmp.replace(file)


if __name__ == "__main__":
    run_stage(main)
