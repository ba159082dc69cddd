"""DVC stage `distill`: safety context distillation (§4.2.4): answers to safety prompts generated with a safety
preprompt, kept where the safety RM prefers them to the plain answer, fine-tuned on without the preprompt
-> checkpoints/chat/ (the final chat model)."""

from __future__ import annotations

import json
from dataclasses import asdict

from components.datasets import read_table
from components.sampling import context_distillation
from components.tracking import stage_run
from components.common import write_json
from flows._stage import finetune, lm_section, load_params, path, ray_config, write_metrics
from model.checkpoint import copy_checkpoint

POLICY, OUT = path("checkpoints/gatt"), path("checkpoints/chat")
REWARD_MODELS = {name: path(f"checkpoints/{name}") for name in ("rm_helpful", "rm_safety")}


def main() -> None:
    params = load_params()
    cfg = lm_section(params, "distill", extra=("preprompt",))
    preprompt = cfg.extra["preprompt"]
    with stage_run("distill", {**asdict(cfg.train), "sample": asdict(cfg.sample), "preprompt": preprompt},
                   params["profile"], [POLICY, *REWARD_MODELS.values(), path("data/raw")], OUT) as run:
        rows = [r for r in read_table(path("data/raw/rl_prompts.parquet")).to_pylist() if r["is_safety"]]
        records = [{"prompt": json.loads(r["prompt"])} for r in rows[:cfg.sample.prompts or None]]
        dialogs, stats = context_distillation(records, POLICY, REWARD_MODELS, preprompt, cfg.sample,
                                              ray_config(params, "distill"))
        print(f"[distill] {stats}")
        if not dialogs and not cfg.replay:
            # Nothing passed the filter: the policy is already as safe as its preprompted self. Say so loudly, and
            # pass the policy on unchanged (metrics kept 0) rather than stop the pipeline.
            print("[distill] WARNING: no preprompted answer beat the plain one on the safety RM; checkpoints/chat "
                  "= checkpoints/gatt unchanged")
            copy_checkpoint(POLICY, OUT)
            write_metrics("distill", stats)
            write_json(path("plots/curves/distill.json"), [])
            write_json(path("plots/curves/distill_val.json"), [])
            return
        finetune(params, "distill", cfg, POLICY, dialogs, OUT, run.info.run_id, extra_metrics=stats)


if __name__ == "__main__":
    main()
