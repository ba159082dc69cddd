"""DVC stage `rejection`: rejection-sampling fine-tuning (§3.2.3): k answers per RL prompt from the SFT policy, the
best by the reward models kept, then fine-tuned on with the SFT loss (Ray Data sampling, Ray Train) -> checkpoints/rs/.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace

from components.data.datasets import read_table, too_long_policy
from components.rlhf.reward import resolve_safety_threshold
from components.rlhf.sampling import rejection_sampling
from components.track.tracking import stage_run
from flows._finetune import RejectionConfig, finetune, fitting_prompts
from flows._stage import load_params, path, stage_config

POLICY, OUT = path("checkpoints/sft"), path("checkpoints/rs")
REWARD_MODELS = {name: path(f"checkpoints/{name}") for name in ("rm_helpful", "rm_safety")}


def main() -> None:
    params = load_params()
    too_long = too_long_policy(params["data"])  # checked before anything runs
    cfg = stage_config(params, "rejection", RejectionConfig, flat=("rlhf",))
    cfg = replace(cfg, safety_threshold=resolve_safety_threshold(cfg.safety_threshold,  # "auto": a number
                                                                 REWARD_MODELS["rm_safety"]))
    with stage_run("rejection", asdict(cfg), params["profile"], [POLICY, *REWARD_MODELS.values(), path("data/raw")],
                   OUT) as run:
        rows = read_table(path("data/raw/rl_prompts.parquet")).to_pylist()[:cfg.sample.prompts or None]
        records = [{"prompt": json.loads(r["prompt"]), "is_safety": r["is_safety"]} for r in rows]
        records, counts = fitting_prompts("rejection", records, POLICY, cfg)
        dialogs, stats = rejection_sampling(records, POLICY, REWARD_MODELS, cfg.sample, cfg.ray, cfg.safety_threshold)
        stats.update(counts)
        print(f"[rejection] {stats}")
        finetune("rejection", cfg, POLICY, dialogs, OUT, run.info.run_id, too_long, extra_metrics=stats)


if __name__ == "__main__":
    main()
