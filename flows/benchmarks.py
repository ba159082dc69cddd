"""DVC stage `benchmarks`: the paper's academic benchmarks on the chat model's HF export with lm-evaluation-harness
-> metrics/benchmarks.json ({task: {metric, value, stderr, n, num_fewshot, metrics}}). `benchmarks.tasks: {}` (tiny,
ci) runs nothing and says so; a stage of its own, so hours of harness runs on the scale profiles rerun only when the
chat model or these params change."""

from __future__ import annotations

from dataclasses import asdict

from components.rlhf.benchmarks import BenchmarkConfig, BenchmarkDataError, benchmark
from components.track.tracking import stage_run
from flows._stage import load_params, path, run_stage, stage_config, write_metrics

CHAT = path("checkpoints/chat")


def main() -> None:
    params = load_params()
    cfg = stage_config(params, "benchmarks", BenchmarkConfig)
    with stage_run("benchmarks", asdict(cfg), params["profile"], [CHAT]):
        import mlflow

        if not cfg.tasks:
            print("[benchmarks] benchmarks.tasks is empty: nothing to run")
            mlflow.set_tag("benchmarks.skipped", "no tasks configured")
            write_metrics("benchmarks", {})
            return
        try:
            results = benchmark(CHAT, cfg)
        except BenchmarkDataError as exc:  # a setup problem, stated in full: no traceback
            raise SystemExit(f"error: {exc}") from None
        for task, row in results.items():
            print(f"[benchmarks] {task} ({row['num_fewshot']}-shot, n={row['n']}): {row['metric']} {row['value']:.4f}"
                  + (f" ± {row['stderr']:.4f}" if row["stderr"] is not None else ""))
            mlflow.log_metrics({f"{task}.{name}{suffix}": m[key] for name, m in row["metrics"].items()
                                for key, suffix in (("value", ""), ("stderr", "_stderr")) if m[key] is not None})
        write_metrics("benchmarks", results)
        mlflow.log_dict(results, "benchmarks.json")


if __name__ == "__main__":
    run_stage(main)
