"""DVC stage `evaluate`: every model stage on held-out prompts (oracle, red-team refusals, GAtt by turn, RM scores)
-> metrics/eval.json, plots/eval_*.json, the promotion gate."""

from __future__ import annotations

import json
from dataclasses import asdict

from components.common import read_json, write_json
from components.data.datasets import read_table
from components.rlhf.evaluate import EvalConfig, evaluate_checkpoint
from components.rlhf.gate import decide
from components.track.registry import champion_metrics
from components.track.tracking import setup_mlflow, stage_run
from flows._stage import load_params, path, stage_config, write_metrics

STAGES = ["base", "sft", "rs", "ppo", "gatt", "chat"]  # model stages in recipe order; the last is the candidate


def main() -> None:
    params = load_params()
    cfg = stage_config(params, "evaluate", EvalConfig, nested=("register",))
    reg = cfg.register
    checkpoints = {name: path(f"checkpoints/{name}") for name in STAGES}
    upstream = list(checkpoints.values()) + [path("checkpoints/rm_helpful"), path("checkpoints/rm_safety")]
    with stage_run("evaluate", asdict(cfg), params["profile"], upstream, None) as run:
        records = read_table(path("data/raw/eval_prompts.parquet")).to_pylist()
        gatt = read_table(path("data/raw/eval_gatt.parquet")).to_pylist()
        rms = {name: path(f"checkpoints/{name}") for name in ("rm_helpful", "rm_safety")}
        table, samples = {}, {}
        for name, ckpt in checkpoints.items():  # each stage's models load in Ray Data actors (evaluate.ray)
            table[name], samples[name] = evaluate_checkpoint(ckpt, records, gatt, rms, cfg)
            print(f"[evaluate] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in table[name].items()))
        rm_acc = {name: read_json(path(f"metrics/{name}.json")) for name in rms}
        candidate = STAGES[-1]
        setup_mlflow()
        champion = champion_metrics(reg.model_name, reg.alias)
        gate = decide(candidate, table[candidate], table["base"], champion, reg.tolerance).to_dict()
        distill = read_json(path("metrics/distill.json"))  # whether chat is a distilled model or gatt passed on
        result = {"models": table, "reward_models": {k: {m: v for m, v in r.items() if "accuracy" in m}
                                                     for k, r in rm_acc.items()}, "gate": gate,
                  "chat_is_gatt": bool(distill.get("chat_is_gatt")), "distill_reason": distill.get("reason", "")}
        write_metrics("eval", result)
        import mlflow

        for name, metrics in table.items():
            mlflow.log_metrics({f"{name}.{k}": v for k, v in metrics.items()})
        mlflow.log_dict(samples, "samples.json")
        mlflow.set_tag("gate.passed", str(gate["passed"]))
        mlflow.set_tag("chat_is_gatt", str(result["chat_is_gatt"]).lower())
        write_json(path("plots/eval_by_stage.json"),
                   [{"stage": name, **{k: v for k, v in m.items()}} for name, m in table.items()])
        write_json(path("reports/eval_samples.json"), {k: v[:20] for k, v in samples.items()})
        write_json(path("reports/evaluate_run.json"), {"stage": "evaluate", "run_id": run.info.run_id})
    header = ["helpfulness", "safety", "refusal_rate_harmful", "false_refusal_rate", "rm_helpful_score",
              "rm_safety_score"]
    print("\n| model | " + " | ".join(header) + " |\n|---|" + "---:|" * len(header))
    for name, metrics in table.items():
        print(f"| {name} | " + " | ".join(f"{metrics.get(h, float('nan')):.3f}" for h in header) + " |")
    print(f"\ngate: {json.dumps(gate)}")
    if result["chat_is_gatt"]:
        print(f"note: chat is the gatt model unchanged ({result['distill_reason']})")


if __name__ == "__main__":
    main()
