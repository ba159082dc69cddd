"""DVC stage `filter`: PII scrub, quality rules, exact + near dedup, toxicity and language filters on Ray Data
-> data/clean/ and reports/filter.json (documents in/out per rule, precision/recall vs the planted labels)."""

from __future__ import annotations

from components.common import write_json
from components.data.filter import FilterConfig, run_filter
from components.cluster import init_ray
from components.track.tracking import stage_run
from components.data.oracle import TOXIC_LEXICON
from flows._stage import load_params, path, ray_config, run_stage, section

OUT = path("data/clean")


def main() -> None:
    params = load_params()
    # The synthetic world's toxic words unless params set filter.toxic_lexicon (FilterConfig's default: a generic list)
    cfg = FilterConfig.from_dict({"toxic_lexicon": sorted(TOXIC_LEXICON), **section(params, "filter")})
    with stage_run("filter", cfg.to_dict(), params["profile"], [path("data/raw")], None) as run:
        init_ray(ray_config(params, "filter"))
        report = run_filter([str(path("data/raw/pretrain.parquet"))], str(OUT), cfg)
        write_json(OUT / "mlflow_run.json", {"stage": "filter", "run_id": run.info.run_id,
                                             "experiment_id": run.info.experiment_id})
        write_json(path("reports/filter.json"), report)
        import mlflow

        mlflow.log_dict(report, "filter_report.json")
        flat = {}
        for key, value in report.items():
            if isinstance(value, (int, float)):
                flat[key] = value
            elif isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        mlflow.log_metrics(flat)
    print(f"[filter] {report.get('documents_in')} documents in, {report.get('documents_out')} out")


if __name__ == "__main__":
    run_stage(main)
