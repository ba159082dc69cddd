"""Ray plumbing for every stage: join a cluster or start a local one, and run a TorchTrainer from params."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from components.common import REPO_ROOT

# ray.train.report() waits for the controller's poll (2 s by default); our loops report every N steps, but a short
# poll keeps small stages from idling. Ray Train's print patch tees every worker print() to both stdout and a logger
# that is also shown on the driver: each progress line came out twice.
_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@dataclass(frozen=True)
class RayConfig:
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker when true
    cpus_per_worker: float = 1.0  # fractional values let data tasks and workers share a small machine
    max_failures: int = 1  # FailureConfig: restarts from the latest checkpoint
    local_num_cpus: int = 4  # logical CPUs of the local cluster (ignored with RAY_ADDRESS)
    storage_path: str = "ray_results"  # Ray Train checkpoints (relative = under the repo); s3://... on clusters


def init_ray(cfg: RayConfig) -> None:
    """Join RAY_ADDRESS if set, else start a local cluster (idempotent)."""
    import ray

    os.environ.update(_ENV)
    _quiet_ray_data()
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": dict(_ENV)}
    if os.environ.get("RAY_ADDRESS"):
        runtime_env["working_dir"] = str(REPO_ROOT)
        runtime_env["excludes"] = [".venv", ".git", "data", "checkpoints", "ray_results", "mlflow.db", ".dvc"]
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env)
    else:
        # The dashboard serves the State API, which Ray Train's placement-group cleaner polls (without it the
        # cleaner warns every few seconds that it cannot); it costs ~2 s of start-up.
        ray.init(num_cpus=cfg.local_num_cpus, include_dashboard=True, runtime_env=runtime_env,
                 logging_level="WARNING")


def _quiet_ray_data() -> None:
    """Ray Data's per-operator progress logs are tens of lines per dataset when stdout is not a terminal; our stages
    print their own progress."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def run_trainer(loop, loop_config: dict, cfg: RayConfig, name: str):
    """Run `loop(config)` on cfg.num_workers Ray Train workers; returns the ray.train.Result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    init_ray(cfg)
    storage = cfg.storage_path if "://" in cfg.storage_path else str((REPO_ROOT / cfg.storage_path).resolve())
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
    )
    return trainer.fit()


def train_to_folder(loop, loop_config: dict, cfg: RayConfig, stage: str, out_dir) -> dict:
    """Run a Ray Train loop whose final report carries a checkpoint; materialise that checkpoint at out_dir
    atomically (through Ray's storage, so it also works when the workers run on other nodes). Returns the final
    metrics."""
    from model.checkpoint import atomic_dir

    result = run_trainer(loop, loop_config, cfg, name=f"{stage}-{int(time.time())}")
    if result.error:
        raise RuntimeError(f"{stage} training failed: {result.error}")
    with atomic_dir(out_dir) as tmp:
        result.checkpoint.to_directory(str(tmp))
    return dict(result.metrics)
