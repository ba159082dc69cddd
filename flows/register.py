"""DVC stage `register`: a registry version of the final chat model and of its round's reward models; the `champion`
alias (on all three) only if the gate passed."""

from __future__ import annotations

from dataclasses import asdict

from components.common import read_json
from components.rlhf.gate import PromotionConfig
from components.track.registry import register_checkpoint
from components.track.tracking import stage_run
from flows._stage import final_round, load_params, path, run_stage, stage_config, write_metrics


def main() -> None:
    params = load_params()
    cfg = stage_config(params, "register", PromotionConfig)
    evaluation = read_json(path("metrics/eval.json"))
    gate = evaluation["gate"]
    candidate = path(f"checkpoints/{gate['candidate']}")
    final = final_round(params)  # the reward models of the last round
    with stage_run("register", asdict(cfg), params["profile"], [candidate], None):
        tags = {f"eval.{k}": v for k, v in evaluation["models"][gate["candidate"]].items()}
        tags.update({"gate.passed": gate["passed"], "gate.compared_with": gate["compared_with"],
                     "profile": params["profile"], "eval_set_sha256": evaluation["eval_set_sha256"]})
        tags["training_run"] = read_json(candidate / "mlflow_run.json")["run_id"]
        alias = cfg.alias if gate["passed"] else None
        info = register_checkpoint(candidate, cfg.model_name, alias, tags)
        for rm in ("rm_helpful", "rm_safety"):  # the alias moves with the chat model's: the serve-time safety guard
            # loads llama2-rm-safety@champion, the safety RM of the served model's round
            register_checkpoint(path(f"checkpoints/{final}/{rm}"), f"llama2-{rm.replace('_', '-')}", alias,
                                {**read_json(path(f"metrics/{final}/{rm}.json")), "chat_version": info["version"]},
                                reward=True)
    write_metrics("register", {**info, "gate_passed": gate["passed"]})
    moved = f"alias '{cfg.alias}' -> version {info['version']}" if gate["passed"] else "gate failed: alias unchanged"
    print(f"[register] {cfg.model_name} version {info['version']} ({moved})")


if __name__ == "__main__":
    run_stage(main)
