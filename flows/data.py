"""DVC stage `data`: the synthetic world (deterministic from params) written as Parquet -> data/raw/."""

from __future__ import annotations

import time

import pyarrow.parquet as pq

from components.tracking import stage_run
from components.world import WorldConfig, generate_world
from flows._stage import load_params, path, section, write_metrics
from model.checkpoint import atomic_dir

OUT = path("data/raw")


def main() -> None:
    params = load_params()
    cfg = section(params, "data")
    if cfg.get("sources"):
        raise SystemExit("error: ingest of real sources is not implemented yet; set data.sources: [] in params.yaml")
    world_cfg = WorldConfig.from_dict(cfg.get("world") or {})
    with stage_run("data", cfg, params["profile"], [], None) as run:
        start = time.perf_counter()
        tables = generate_world(world_cfg)
        with atomic_dir(OUT) as tmp:
            for name, table in tables.items():
                pq.write_table(table, tmp / f"{name}.parquet")
            from components.common import write_json

            write_json(tmp / "mlflow_run.json", {"stage": "data", "run_id": run.info.run_id,
                                                 "experiment_id": run.info.experiment_id})
        metrics = {f"rows_{name}": table.num_rows for name, table in tables.items()}
        metrics["seconds"] = time.perf_counter() - start
        import mlflow

        mlflow.log_metrics(metrics)
        write_metrics("data", metrics)
    print(f"[data] {metrics}")


if __name__ == "__main__":
    main()
