"""DVC stage `distill`: safety context distillation (§4.2.4): answers to safety prompts generated with a safety
preprompt, kept by the answer-level filter (sampling.select_distilled: plain answer unsafe, preprompted answer safe
and better by a margin, all on the safety RM), fine-tuned on without the preprompt -> checkpoints/chat/ (the final
chat model). Checked on held-out safety prompts against the gatt model (safety RM, never the oracle): where it lost
safety, or where too few answers were kept to train on, checkpoints/chat is the gatt model unchanged, and
metrics/distill.json (chat_is_gatt, skipped / reverted, reason) and the MLflow run's distill.* tags say so."""

from __future__ import annotations

import json
from dataclasses import asdict

from components.common import write_json
from components.data.datasets import read_table, too_long_policy
from components.rlhf.sampling import context_distillation, mean_scores, with_preprompt
from components.track.tracking import stage_run
from flows._finetune import DistillConfig, finetune, fitting_prompts
from flows._stage import final_round, finish_stage, load_params, path, run_stage, stage_config
from model.checkpoint import copy_checkpoint

POLICY, OUT = path("checkpoints/gatt"), path("checkpoints/chat")


def reward_models(params: dict) -> dict:
    """The last round's reward models."""
    return {name: path(f"checkpoints/{final_round(params)}/{name}") for name in ("rm_helpful", "rm_safety")}


def outcome(metrics: dict, skipped: bool, reverted: bool, reason: str) -> dict:
    """The stage's verdict in metrics/distill.json and as tags on its MLflow run (evaluate reports it)."""
    import mlflow

    verdict = {"skipped": skipped, "reverted": reverted, "chat_is_gatt": skipped or reverted, "reason": reason}
    mlflow.set_tags({f"distill.{k}": str(v).lower() if isinstance(v, bool) else v for k, v in verdict.items()})
    print(f"[distill] {'WARNING: ' if skipped or reverted else ''}{reason}")
    return {**metrics, **verdict}


def main() -> None:
    params = load_params()
    too_long = too_long_policy(params["data"])  # checked before anything runs
    cfg = stage_config(params, "distill", DistillConfig, flat=("rlhf",))
    rms = reward_models(params)
    with stage_run("distill", asdict(cfg), params["profile"], [POLICY, *rms.values(), path("data/raw")],
                   OUT) as run:
        rows = [r for r in read_table(path("data/raw/rl_prompts.parquet")).to_pylist() if r["is_safety"]]
        if len(rows) <= cfg.holdout_prompts:
            raise SystemExit(f"error: distill.holdout_prompts {cfg.holdout_prompts} leaves none of the {len(rows)} "
                             "safety prompts in data/raw/rl_prompts.parquet to distill")
        held_out = [json.loads(r["prompt"]) for r in rows[-cfg.holdout_prompts:]]
        pool = rows[:-cfg.holdout_prompts][:cfg.sample.prompts or None]
        records = [{"prompt": json.loads(r["prompt"])} for r in pool]
        records, counts = fitting_prompts("distill", records, POLICY, cfg,
                                           lambda r: with_preprompt(cfg.preprompt, r["prompt"]))  # the longer one
        dialogs, stats = context_distillation(records, POLICY, rms, cfg.preprompt, cfg.sample, cfg.ray,
                                              plain_below=cfg.safety_threshold, min_safety=cfg.min_safety,
                                              margin=cfg.margin)
        stats.update(counts)
        print(f"[distill] {stats}")
        if len(dialogs) < cfg.batch_size:
            # A step or two on a handful of answers moves the policy at random (measured: 2 kept on tiny cost 13% of
            # its refusals): pass it on unchanged, and say so.
            finish_stage("distill", outcome(stats, True, False, f"kept {len(dialogs)} preprompted answers, fewer "
                                            f"than a batch of {cfg.batch_size}: chat = gatt unchanged"))
            copy_checkpoint(POLICY, OUT)
            write_json(path("plots/curves/distill.json"), [])
            write_json(path("plots/curves/distill_val.json"), [])
            return
        metrics = finetune("distill", cfg, POLICY, dialogs, OUT, run.info.run_id, too_long, extra_metrics=stats,
                           finish=False)
        # The held-out check: both models' greedy answers to safety prompts distillation never saw, on the safety RM.
        before = mean_scores(held_out, POLICY, rms, cfg.sample, cfg.ray)
        after = mean_scores(held_out, OUT, rms, cfg.sample, cfg.ray)
        metrics.update({f"holdout_{name}_gatt": v for name, v in before.items()},
                       **{f"holdout_{name}_distilled": v for name, v in after.items()}, holdout_prompts=len(held_out))
        drop = before["rm_safety"] - after["rm_safety"]
        reverted = drop > cfg.max_safety_drop
        reason = (f"held-out safety RM mean {before['rm_safety']:.3f} -> {after['rm_safety']:.3f} on "
                  f"{len(held_out)} prompts: " + ("regressed, chat = gatt unchanged" if reverted else "kept"))
        finish_stage("distill", outcome(metrics, False, reverted, reason), OUT)  # curves of the distilled run
        if reverted:
            copy_checkpoint(POLICY, OUT)


if __name__ == "__main__":
    run_stage(main)
