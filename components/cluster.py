"""Ray for every stage: the `ray` params section, and joining a cluster (RAY_ADDRESS) or starting a local one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from components.common import REPO_ROOT

# ray.train.report() waits for the controller's poll (2 s by default); our loops report every N steps, but a short
# poll keeps small stages from idling. Ray Train's print patch tees every worker print() to both stdout and a logger
# that is also shown on the driver: each progress line came out twice.
_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# On a cluster of this machine (started here, or flows.repro's shared one) two background costs go:
# - Ray Train's preemption watcher: no node here is preempted, and it is one more actor process (~1.6 s of CPU) in
#   every training stage. Remote clusters (spot nodes) keep it.
# - Prometheus metrics: nothing scrapes them here, and every Ray process (a Train stage has seven) collected them in
#   the background. Measured on 2 cores, pretraining 120 steps: 8.3-9.0k -> 9.0-9.6k tokens/s, 4-15 s less a stage.
_LOCAL_ENV = {**_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_enable_metrics_collection": "0"}
_SHARED = "LLAMA2_RAY_SHARED"  # = RAY_ADDRESS when that is shared_local_cluster's: same machine, same checkout


@dataclass(frozen=True)
class RayConfig:
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker when true
    cpus_per_worker: float = 1.0  # fractional values let data tasks and workers share a small machine
    max_failures: int = 1  # FailureConfig: restarts from the latest checkpoint
    local_num_cpus: int = 4  # logical CPUs of the local cluster (ignored with RAY_ADDRESS)
    storage_path: str = "ray_results"  # Ray Train checkpoints (relative = under the repo); s3://... on clusters
    num_to_keep: int | None = 2  # Ray Train checkpoints kept per run (resume points; None = all)
    # How the training stages spread the model (components/train/parallel.py): "ddp" (a full replica per worker) or
    # "fsdp" (FSDP2: parameters, gradients and optimizer state sharded over the workers).
    strategy: str = "ddp"
    activation_checkpointing: bool = False  # fsdp: recompute each block's activations in backward
    cpu_offload: bool = False  # fsdp on GPUs: parameters, gradients and optimizer state kept in host memory

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"params section 'ray': strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if (self.activation_checkpointing or self.cpu_offload) and self.strategy != "fsdp":
            raise ValueError("params section 'ray': activation_checkpointing and cpu_offload need strategy 'fsdp'")
        if self.cpu_offload and not self.use_gpu:
            raise ValueError("params section 'ray': cpu_offload keeps GPU training state in host memory; it needs "
                             "use_gpu")
        if self.num_to_keep is not None and self.num_to_keep < 1:
            raise ValueError(f"params section 'ray': num_to_keep must be >= 1 or null, got {self.num_to_keep}")


def init_ray(cfg: RayConfig) -> None:
    """Join RAY_ADDRESS if set, else start a local cluster (idempotent)."""
    import ray

    local = os.environ.get(_SHARED) == os.environ.get("RAY_ADDRESS")  # no address: a cluster started here
    env = _LOCAL_ENV if local else _ENV
    os.environ.update(env)  # this process's, and a cluster started here inherits them
    _quiet_ray_data()
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": dict(env)}
    if address := os.environ.get("RAY_ADDRESS"):
        if not local:  # a remote cluster: its workers need this checkout's code
            runtime_env["working_dir"] = str(REPO_ROOT)
            runtime_env["excludes"] = [".venv", ".git", "data", "checkpoints", "ray_results", "mlflow.db", ".dvc"]
        ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
    else:
        # The dashboard serves the State API, which Ray Train's placement-group cleaner polls (without it the
        # cleaner warns every few seconds that it cannot); it costs ~2 s of start-up.
        ray.init(num_cpus=cfg.local_num_cpus, include_dashboard=True, runtime_env=runtime_env,
                 logging_level="WARNING")


@contextmanager
def shared_local_cluster(cfg: RayConfig) -> Iterator[dict[str, str]]:
    """One local Ray cluster, from this checkout, for every stage of a `dvc repro` (flows.repro): yields the
    environment that makes a stage's init_ray join it instead of starting and stopping its own (~5 s a stage)."""
    import ray

    os.environ.update(_LOCAL_ENV)  # the cluster's processes inherit them; the stages get them below
    ray.init(num_cpus=cfg.local_num_cpus, include_dashboard=True, logging_level="WARNING")
    address = ray.get_runtime_context().gcs_address
    # ray.init turned token auth on in this process's environment (Ray 2.60's default): the stages need it too.
    auth = {k: os.environ[k] for k in ("RAY_AUTH_MODE",) if k in os.environ}
    try:
        yield {"RAY_ADDRESS": address, _SHARED: address, **auth, **_LOCAL_ENV}
    finally:
        ray.shutdown()


def _quiet_ray_data() -> None:
    """Ray Data's per-operator progress logs are tens of lines per dataset when stdout is not a terminal; our stages
    print their own progress."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
