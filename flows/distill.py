"""DVC stage `distill`: safety context distillation (§4.2.4): answers to safety prompts generated with a safety
preprompt, kept where the safety RM prefers them to the plain answer, fine-tuned on without the preprompt
-> checkpoints/chat/ (the final chat model)."""

from __future__ import annotations

import json
from dataclasses import asdict

from components.common import write_json
from components.data.datasets import read_table, too_long_policy
from components.rlhf.sampling import context_distillation, with_preprompt
from components.track.tracking import stage_run
from flows._finetune import DistillConfig, finetune, fitting_prompts
from flows._stage import finish_stage, load_params, path, stage_config
from model.checkpoint import copy_checkpoint

POLICY, OUT = path("checkpoints/gatt"), path("checkpoints/chat")
REWARD_MODELS = {name: path(f"checkpoints/{name}") for name in ("rm_helpful", "rm_safety")}


def main() -> None:
    params = load_params()
    too_long = too_long_policy(params["data"])  # checked before anything runs
    cfg = stage_config(params, "distill", DistillConfig)
    with stage_run("distill", asdict(cfg), params["profile"], [POLICY, *REWARD_MODELS.values(), path("data/raw")],
                   OUT) as run:
        rows = [r for r in read_table(path("data/raw/rl_prompts.parquet")).to_pylist() if r["is_safety"]]
        records = [{"prompt": json.loads(r["prompt"])} for r in rows[:cfg.sample.prompts or None]]
        records, counts = fitting_prompts("distill", records, POLICY, cfg,
                                           lambda r: with_preprompt(cfg.preprompt, r["prompt"]))  # the longer one
        dialogs, stats = context_distillation(records, POLICY, REWARD_MODELS, cfg.preprompt, cfg.sample, cfg.ray)
        stats.update(counts)
        print(f"[distill] {stats}")
        if len(dialogs) < cfg.batch_size and not cfg.replay:
            # Fewer kept answers than one batch: the policy is already about as safe as its preprompted self, and a
            # step or two on a handful of answers moves it at random (measured: 2 kept on tiny cost 13% of its
            # refusals). Say so loudly and pass the policy on unchanged rather than train on noise or stop.
            print(f"[distill] WARNING: only {len(dialogs)} preprompted answers beat the plain ones on the safety RM "
                  f"(fewer than a batch of {cfg.batch_size}); checkpoints/chat = checkpoints/gatt unchanged")
            copy_checkpoint(POLICY, OUT)
            finish_stage("distill", stats)
            write_json(path("plots/curves/distill.json"), [])
            write_json(path("plots/curves/distill_val.json"), [])
            return
        finetune("distill", cfg, POLICY, dialogs, OUT, run.info.run_id, too_long, extra_metrics=stats)


if __name__ == "__main__":
    main()
