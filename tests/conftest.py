"""Shared fixtures. Tests make their own data: no network, no GPU."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One real local Ray cluster for the whole session (4 logical CPUs so data tasks and 2 train workers fit)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
