"""DVC stage `ppo`: RLHF with PPO against both reward models (Ray Train) -> checkpoints/ppo/."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

from components.data.datasets import fit_context, read_table
from components.rlhf.reward import resolve_safety_threshold
from components.train.ppo import PPOStageConfig, train_ppo
from components.track.tracking import stage_run
from flows._stage import finish_stage, load_params, path, stage_config
from model.chat import encode_prompt
from model.checkpoint import load_args
from model.tokenizer import Tokenizer

OUT = path("checkpoints/ppo")
POLICY = "checkpoints/rs"  # the stage before PPO in this DAG: rejection-sampling fine-tuning


def main() -> None:
    params = load_params()
    policy, rm_h, rm_s = path(POLICY), path("checkpoints/rm_helpful"), path("checkpoints/rm_safety")
    cfg = stage_config(params, "ppo", PPOStageConfig, flat=("rlhf",))
    cfg = replace(cfg, safety_threshold=resolve_safety_threshold(cfg.safety_threshold, rm_s))  # "auto": a number
    with stage_run("ppo", asdict(cfg), params["profile"], [policy, rm_h, rm_s, path("data/raw")], OUT) as run:
        tokenizer = Tokenizer.load(policy / "tokenizer.model")
        rows = read_table(path("data/raw/rl_prompts.parquet")).to_pylist()
        encoded = [(encode_prompt(tokenizer, json.loads(r["prompt"])), bool(r["is_safety"])) for r in rows]
        encoded, counts = fit_context(encoded, [len(p) for p, _ in encoded],
                                       load_args(policy).max_seq_len - cfg.max_new_tokens, "prompts", "ppo")
        metrics = train_ppo(policy, rm_h, rm_s, [p for p, _ in encoded], [s for _, s in encoded], cfg, "ppo", OUT,
                            run.info.run_id)
        finish_stage("ppo", {**metrics, **counts}, OUT)

if __name__ == "__main__":
    main()
