"""The cluster's tracking and storage, real parts on 127.0.0.1 (infra/mlflow/local_stack.py): an MLflow server with
runs in PostgreSQL and artifacts in an S3 bucket (moto's server), and a DVC remote in the same bucket. The first
three stages run with `dvc repro tokenizer` in a copy of the repo against that server, their outs are pushed, and an
empty clone pulls them back byte for byte.

The end-to-end test is slow (~1-2 min). It needs PostgreSQL's binaries (apt-get install postgresql) and the dev
extra (moto, psycopg2, boto3; dvc-s3): skipped without them, except under CI=true, where it must run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from components.common import REPO_ROOT
from tests.helpers import copy_repo

BIN = Path(sys.executable).parent  # the venv's dvc
_spec = importlib.util.spec_from_file_location("local_stack", REPO_ROOT / "infra/mlflow/local_stack.py")
local_stack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_stack)
STAGES = ["data", "filter", "tokenizer"]


def _missing() -> str | None:
    if local_stack.postgres_bin() is None:
        return "PostgreSQL binaries not found (apt-get install postgresql, or PG_BIN=<folder of initdb>)"
    for module in ("moto", "psycopg2", "boto3", "dvc_s3"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[dev]')"
    return None


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def stack():
    if (reason := _missing()) and not os.environ.get("CI"):
        pytest.skip(reason)
    start = time.perf_counter()
    with local_stack.LocalStack() as running:  # stops every process, also when the test fails
        print(f"stack up in {time.perf_counter() - start:.1f} s")
        yield running


def _md5s(repo: Path, outs: list[str]) -> dict[str, str]:
    files = [f for out in outs for f in sorted((repo / out).rglob("*") if (repo / out).is_dir() else [repo / out])]
    return {str(f.relative_to(repo)): hashlib.md5(f.read_bytes()).hexdigest() for f in files if f.is_file()}


@pytest.mark.slow
def test_stages_track_to_postgres_and_s3_and_dvc_pull_restores_the_outs(stack, tmp_path, no_ray):
    import boto3
    import psycopg2
    from mlflow import MlflowClient

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(PATH=f"{BIN}:{os.environ['PATH']}", MLFLOW_TRACKING_URI=stack.env["MLFLOW_TRACKING_URI"])
    dvc_env = {**env, **stack.env}  # the stages need no bucket credentials (the server proxies artifacts); DVC does
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost"]

    repo = copy_repo(tmp_path / "first")
    shutil.copy(repo / "infra/profiles/ci.yaml", repo / "params.yaml")
    _run(["git", "init", "-q"], repo, env, 60)
    _run(["dvc", "remote", "add", "-d", "storage", f"s3://{stack.bucket}/dvc"], repo, env, 60)
    _run(["dvc", "remote", "modify", "storage", "endpointurl", stack.s3_endpoint], repo, env, 60)
    _run(["git", "add", "-A"], repo, env, 60)
    _run([*git, "commit", "-qm", "first"], repo, env, 60)
    start = time.perf_counter()
    _run(["dvc", "repro", "tokenizer"], repo, {**env, "PYTHONPATH": str(repo)}, 600)
    print(f"dvc repro tokenizer: {time.perf_counter() - start:.1f} s")

    # MLflow: one finished run per stage, with its tags, on the server
    client = MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name("llama2-recipe")
    runs = {r.data.tags["dvc.stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(STAGES) and all(r.info.status == "FINISHED" for r in runs.values())
    tokenizer_run = runs["tokenizer"].info.run_id
    assert runs["tokenizer"].data.tags["upstream.filter"] == runs["filter"].info.run_id
    assert [a.path for a in client.list_artifacts(tokenizer_run)] == ["tokenizer.model"]
    # ... its artifact is in the bucket, the bytes the stage wrote
    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, **local_stack._boto_credentials())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.bucket, Prefix="mlflow/")["Contents"]]
    [key] = [k for k in keys if k.endswith(f"{tokenizer_run}/artifacts/tokenizer.model")]
    body = s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read()
    assert body == (repo / "artifacts/tokenizer/tokenizer.model").read_bytes()
    assert any(k.endswith(f"{runs['filter'].info.run_id}/artifacts/filter_report.json") for k in keys)
    # ... and PostgreSQL holds the run
    with psycopg2.connect(stack.postgres_uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT r.status, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                    "AND t.key = 'dvc.stage' WHERE r.run_uuid = %s", (tokenizer_run,))
        assert cur.fetchall() == [("FINISHED", "tokenizer")]
    conn.close()

    # DVC: push every out, then an empty clone pulls them back
    _run(["dvc", "push"], repo, dvc_env, 300)
    assert s3.list_objects_v2(Bucket=stack.bucket, Prefix="dvc/")["KeyCount"] > 0
    _run(["git", "add", "-A"], repo, env, 60)  # dvc.lock and the uncached metrics, as a user commits them
    _run([*git, "commit", "-qm", "repro"], repo, env, 60)
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    cached = [out for stage in STAGES for out in spec[stage]["outs"] if isinstance(out, str)]  # the rest is in git
    assert cached == ["data/raw", "data/clean", "artifacts/tokenizer"]

    clone = tmp_path / "second"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env, 60)
    assert not any((clone / out).exists() for out in cached)
    _run(["dvc", "pull", *STAGES], clone, dvc_env, 300)
    expected = _md5s(repo, cached)
    assert len(expected) > len(cached) and _md5s(clone, cached) == expected
    status = _run(["dvc", "status", *STAGES], clone, dvc_env, 120).stdout
    assert "Data and pipelines are up to date" in status, status


def test_compose_publishes_nothing_on_all_interfaces():
    """MLflow has no authentication in infra/mlflow/docker-compose.yaml: every published port is bound to
    127.0.0.1 ("5000:5000" would publish it on every interface of the host)."""
    services = yaml.safe_load((REPO_ROOT / "infra/mlflow/docker-compose.yaml").read_text())["services"]
    ports = [(name, str(port)) for name, spec in services.items() for port in spec.get("ports", [])]
    assert ("mlflow", "127.0.0.1:5000:5000") in ports and all(p.startswith("127.0.0.1:") for _, p in ports), ports
