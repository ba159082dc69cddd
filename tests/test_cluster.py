"""flows.repro's shared cluster: a stage's init_ray joins it (no cluster of its own) and its tasks import this
checkout's code without a working_dir upload."""

import os
import subprocess
import sys

from components.cluster import RayConfig, shared_local_cluster
from components.common import REPO_ROOT

STAGE = """
import os
import ray
from components.cluster import RayConfig, init_ray
init_ray(RayConfig())
print(ray.get_runtime_context().gcs_address)
print(ray.get(ray.remote(lambda: __import__("components.cluster").__file__).remote()))
env = lambda: [os.environ.get(k) for k in ("RAY_enable_metrics_collection", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")]
print(*env(), *ray.get(ray.remote(env).remote()))  # the stage's own and its tasks'
"""


def test_a_stage_joins_the_shared_cluster(no_ray):
    before = dict(os.environ)  # as flows.repro passes it on: taken before the cluster starts
    with shared_local_cluster(RayConfig(local_num_cpus=2)) as env:
        assert env["RAY_ADDRESS"]
        out = subprocess.run([sys.executable, "-c", STAGE], cwd=REPO_ROOT, env={**before, **env},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        address, module, *local_env = out.stdout.split()[-6:]
    assert address == env["RAY_ADDRESS"]
    assert module.startswith(str(REPO_ROOT))  # this checkout, not an uploaded copy
    assert local_env == ["0"] * 4  # no metrics collection, no preemption watcher: in the stage and in its tasks
