"""DVC stage `ppo@<round>`: RLHF with PPO from the round's rejection-sampling model against the round's reward
models (Ray Train) -> checkpoints/<round>/ppo/."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

from components.data.datasets import fit_context, read_table
from components.rlhf.reward import resolve_safety_threshold
from components.train.ppo import PPOStageConfig, train_ppo
from components.track.tracking import stage_run
from flows._stage import finish_stage, load_params, path, rlhf_round, round_arg, run_stage, stage_config
from model.chat import encode_prompt
from model.checkpoint import load_args
from model.tokenizer import Tokenizer


def main() -> None:
    name = round_arg()
    params = load_params()
    rlhf_round(params, name)  # a round of params rlhf.rounds
    policy = path(f"checkpoints/{name}/rs")  # the stage before PPO in a round: rejection-sampling fine-tuning
    rm_h, rm_s = path(f"checkpoints/{name}/rm_helpful"), path(f"checkpoints/{name}/rm_safety")
    stage, out = f"ppo@{name}", path(f"checkpoints/{name}/ppo")
    cfg = stage_config(params, "ppo", PPOStageConfig, flat=("rlhf",))
    cfg = replace(cfg, safety_threshold=resolve_safety_threshold(cfg.safety_threshold, rm_s))  # "auto": a number
    with stage_run(stage, asdict(cfg), params["profile"], [policy, rm_h, rm_s, path("data/raw")], out) as run:
        tokenizer = Tokenizer.load(policy / "tokenizer.model")
        rows = read_table(path("data/raw/rl_prompts.parquet")).to_pylist()
        encoded = [(encode_prompt(tokenizer, json.loads(r["prompt"])), bool(r["is_safety"])) for r in rows]
        encoded, counts = fit_context(encoded, [len(p) for p, _ in encoded],
                                       load_args(policy).max_seq_len - cfg.max_new_tokens, "prompts", stage)
        metrics = train_ppo(policy, rm_h, rm_s, [p for p, _ in encoded], [s for _, s in encoded], cfg, stage, out,
                            run.info.run_id)
        finish_stage(stage, {**metrics, **counts}, out)


if __name__ == "__main__":
    run_stage(main)
