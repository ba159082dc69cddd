"""DVC stage `data`: the synthetic world (deterministic from params) and any real sources (params data.sources,
components/data/ingest.py) written as Parquet -> data/raw/."""

from __future__ import annotations

import time
from dataclasses import asdict

from components.data.ingest import DataConfig, IngestError, build_data, lineage_params, write_data
from components.track.tracking import stage_run
from flows._stage import load_params, path, run_stage, section, write_metrics

OUT = path("data/raw")


def main() -> None:
    params = load_params()
    start = time.perf_counter()
    try:  # every source is checked and read before the MLflow run opens and anything is written
        cfg = DataConfig.from_dict(section(params, "data"))
        data = build_data(cfg)
    except IngestError as e:
        raise SystemExit(f"error: {e}") from None
    with stage_run("data", asdict(cfg), params["profile"], [], None) as run:
        metrics = write_data(data, OUT, {"mlflow_run.json": {"stage": "data", "run_id": run.info.run_id,
                                                             "experiment_id": run.info.experiment_id}})
        metrics["seconds"] = time.perf_counter() - start
        import mlflow

        mlflow.log_params(lineage_params(data))
        mlflow.log_metrics(metrics)
        write_metrics("data", metrics)
    print(f"[data] {metrics}")


if __name__ == "__main__":
    run_stage(main)
