"""DVC stage `evaluate`: every model stage on held-out prompts (oracle, red-team refusals, GAtt by turn, RM scores),
each metric with its n and 95% interval -> metrics/eval.json, plots/eval_*.json, the promotion gate."""

from __future__ import annotations

from dataclasses import asdict

from components.common import read_json, write_json
from components.data.datasets import read_table
from components.rlhf.evaluate import EvalConfig, eval_set_sha256, evaluate_checkpoints, promotion_gate
from components.track.tracking import RUN_FILE, stage_run
from flows._stage import final_round, load_params, path, rlhf_rounds, run_stage, stage_config, write_metrics


def model_stages(params: dict) -> dict[str, object]:
    """{model stage: checkpoint} in recipe order, each round's rs and ppo as <round>.rs, <round>.ppo; the last,
    chat, is the candidate."""
    rounds = [f"{r}.{m}" for r in rlhf_rounds(params) for m in ("rs", "ppo")]
    return {name: path(f"checkpoints/{name.replace('.', '/')}") for name in ["base", "sft", *rounds, "gatt", "chat"]}


def flat(metrics: dict) -> dict[str, float]:
    """Scalars only: each <m>_ci95 = [lo, hi] becomes <m>_ci95_lo and <m>_ci95_hi (MLflow metrics, dvc plots)."""
    out = {}
    for key, value in metrics.items():
        out.update({f"{key}_lo": value[0], f"{key}_hi": value[1]} if isinstance(value, list) else {key: value})
    return out


def main() -> None:
    params = load_params()
    cfg = stage_config(params, "evaluate", EvalConfig, nested=("register",))
    checkpoints = model_stages(params)
    rms = {name: path(f"checkpoints/{final_round(params)}/{name}") for name in ("rm_helpful", "rm_safety")}
    upstream = list(checkpoints.values()) + list(rms.values())
    with stage_run("evaluate", asdict(cfg), params["profile"], upstream, None) as run:
        import mlflow

        records = read_table(path("data/raw/eval_prompts.parquet")).to_pylist()
        gatt = read_table(path("data/raw/eval_gatt.parquet")).to_pylist()
        eval_sha = eval_set_sha256(records, gatt)
        mlflow.set_tag("eval_set_sha256", eval_sha)
        distill = read_json(path("metrics/distill.json"))  # whether chat is a distilled model or gatt passed on
        # chat_is_gatt: the same weights as gatt, so the same greedy answers (not evaluated twice)
        source = {n: "gatt" if n == "chat" and distill.get("chat_is_gatt") else n for n in checkpoints}
        done = evaluate_checkpoints({n: c for n, c in checkpoints.items() if source[n] == n}, records, gatt, rms, cfg)
        table = {n: done[s][0] for n, s in source.items()}
        samples = {n: done[s][1] for n, s in source.items()}
        for name, metrics in table.items():
            print(f"[evaluate] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                      if isinstance(v, float)))
        run_ids = {name: read_json(ckpt / RUN_FILE)["run_id"] for name, ckpt in checkpoints.items()
                   if (ckpt / RUN_FILE).is_file()}
        gate, champion = promotion_gate("chat", samples, run_ids, records, params["profile"], cfg)
        rm_acc = {name: read_json(path(f"metrics/{final_round(params)}/{name}.json")) for name in rms}
        result = {"eval_set_sha256": eval_sha, "models": table,
                  "reward_models": {k: {m: v for m, v in r.items() if "accuracy" in m} for k, r in rm_acc.items()},
                  "gate": gate, **({"champion": champion} if champion else {}),
                  "chat_is_gatt": bool(distill.get("chat_is_gatt")), "distill_reason": distill.get("reason", "")}
        write_metrics("eval", result)
        for name, metrics in table.items():
            mlflow.log_metrics({f"{name}.{k}": v for k, v in flat(metrics).items()})
        mlflow.log_dict(samples, "samples.json")
        mlflow.set_tag("gate.passed", str(gate["passed"]))
        mlflow.set_tag("chat_is_gatt", str(result["chat_is_gatt"]).lower())
        write_json(path("plots/eval_by_stage.json"), [{"stage": name, **flat(m)} for name, m in table.items()])
        write_json(path("reports/eval_samples.json"), {k: v[:20] for k, v in samples.items()})
        write_json(path("reports/evaluate_run.json"), {"stage": "evaluate", "run_id": run.info.run_id})
    print_table(table, gate)
    if result["chat_is_gatt"]:
        print(f"note: chat is the gatt model unchanged ({result['distill_reason']})")


def _cell(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "–"
    lo, hi = metrics[f"{key}_ci95"]
    return f"{metrics[key]:.3f} [{lo:.2f}, {hi:.2f}]"


def print_table(table: dict, gate: dict) -> None:
    """Each stage's main metrics as `value [lo, hi]` (95%), then the gate per metric."""
    header = ["helpfulness", "safety", "refusal_rate_harmful", "false_refusal_rate", "rm_helpful_score",
              "rm_safety_score"] + sorted((k for k in table["chat"] if k.startswith("gatt_turn") and
                                           k.removeprefix("gatt_turn").isdigit()), key=lambda k: int(k[9:]))
    print("\n| model | " + " | ".join(header) + " |\n|---|" + "---:|" * len(header))
    for name, metrics in table.items():
        print(f"| {name} | " + " | ".join(_cell(metrics, h) for h in header) + " |")
    chat = table["chat"]
    items = lambda count: f" ({count} items)" if count else ""  # noqa: E731
    print("n: " + ", ".join(f"{h} {chat.get(h + '_n', 0)}{items(chat.get(h + '_items'))}" for h in header))
    print("intervals: clustered by held-out item (the phrasings of one item are answered alike)")
    if by_instruction := sorted(k for k in chat if k.startswith("gatt_") and not k.startswith("gatt_turn")
                                and not k.endswith(("_n", "_ci95", "_items"))):
        print("chat's GAtt turns 2-4 by instruction: " + ", ".join(
            f"{k.removeprefix('gatt_')} {_cell(chat, k)} (n {chat[k + '_n']})" for k in by_instruction))
    print(f"\ngate vs {gate['compared_with']} ({gate['baseline_reason']}): {'PASSED' if gate['passed'] else 'FAILED'}")
    for metric, check in gate["metrics"].items():
        lo, hi = check["diff_ci95"]
        print(f"  {metric}: {check['candidate']:.3f} vs {check['baseline']:.3f}, diff {check['diff']:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}] (n {check['n']}{items(check.get('items'))}) "
              f"{'ok' if check['passed'] else 'FAIL'}")


if __name__ == "__main__":
    run_stage(main)
