"""`python -m flows.repro [dvc repro arguments]`: `dvc repro` with one local Ray cluster that every stage joins
(what `make run` runs). Plain `dvc repro` gives the same results, each stage starting and stopping its own cluster
(~5 s more a stage); with RAY_ADDRESS set the stages join that cluster and this adds nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from components.cluster import RayConfig, shared_local_cluster
from components.common import config_from_dict
from flows._stage import load_params, section


def main() -> None:
    # The stages' `python` and `dvc` are this interpreter's, as `make run` puts the venv first on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [sys.executable, "-m", "dvc", "repro", *sys.argv[1:]]
    if os.environ.get("RAY_ADDRESS"):
        sys.exit(subprocess.call(command, env=env))
    try:
        cfg = config_from_dict(RayConfig, section(load_params(), "ray"), "ray")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    with shared_local_cluster(cfg) as cluster:
        code = subprocess.call(command, env={**env, **cluster})
    sys.exit(code)


if __name__ == "__main__":
    main()
