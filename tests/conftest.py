"""Shared fixtures. Tests make their own data: no network, no GPU."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster (4 logical CPUs, so data tasks and 2 train workers fit), started on first use and
    kept for the session; a test that must have no cluster in this process (the end-to-end pipeline, whose stages
    start their own) shuts it down with `no_ray` and the next user starts it again."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="module")
def no_ray():
    """No Ray cluster of this process alive: a second local cluster on the machine confuses Ray's own address
    lookups in the pipeline's stages ("Found multiple active Ray instances")."""
    import ray

    ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    import ray

    ray.shutdown()
