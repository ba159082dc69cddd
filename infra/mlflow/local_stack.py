"""The cluster tracking and storage stack as local processes, bound to 127.0.0.1: PostgreSQL (Debian's packages, or
initdb/postgres on PATH), an S3-compatible server (moto's server mode, in memory) and an MLflow server with runs in
PostgreSQL and artifacts in the bucket. Throwaway: everything is gone when it stops. For trying the cluster setup on
one machine and for tests/test_cluster_tracking.py; docker-compose.yaml here is the real deployment.

    .venv/bin/python infra/mlflow/local_stack.py     # prints the env to export, runs until Ctrl-C

PostgreSQL refuses to run as root: as root, it runs as the `postgres` system user the Debian package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's mlflow and moto_server
# moto accepts any credentials; these only have to be set, for the MLflow server and for DVC.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def postgres_bin() -> Path | None:
    """The folder of initdb and postgres: $PG_BIN, Debian's newest /usr/lib/postgresql/<v>/bin, or PATH."""
    candidates = [os.environ.get("PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    candidates.append(str(Path(shutil.which("initdb") or "/nonexistent").parent))
    return next((Path(c) for c in candidates if c and (Path(c) / "initdb").is_file()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready, what: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


class LocalStack:
    """Start with start() (or `with LocalStack() as stack:`); stop() ends every process and removes the data.
    After start: `env` (what a client exports), `postgres_uri`, `bucket`, `s3_endpoint`."""

    def __init__(self, bucket: str = "llama2", log_dir: str | Path | None = None):
        self.bucket = bucket
        self.workdir = Path(tempfile.mkdtemp(prefix="llama2-stack-"))  # in /tmp: reachable by the postgres user
        self.log_dir = Path(log_dir) if log_dir else self.workdir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.password = "mlflow-local"

    def _start(self, name: str, cmd: list[str], user: str | None = None, env: dict | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, user=user,
                                env=env, start_new_session=True)  # its own group: stop() ends its workers too
        log.close()
        self.procs.append((name, proc))
        return proc

    def _postgres(self) -> None:
        pg = postgres_bin()
        if pg is None:
            raise RuntimeError("PostgreSQL binaries not found (apt-get install postgresql, or set PG_BIN)")
        user = "postgres" if os.geteuid() == 0 else None
        data = self.workdir / "postgres"
        data.mkdir()
        (self.workdir / "pwfile").write_text(self.password)
        if user:
            for path in (self.workdir, data, self.workdir / "pwfile"):
                shutil.chown(path, user)
        subprocess.run([str(pg / "initdb"), "-D", str(data), "-U", "mlflow", "--pwfile", str(self.workdir / "pwfile"),
                        "--auth=scram-sha-256", "--locale=C", "-E", "UTF8"], cwd=self.workdir, user=user,
                       check=True, capture_output=True, timeout=120)
        self.pg_port = free_port()
        proc = self._start("postgres", [str(pg / "postgres"), "-D", str(data), "-p", str(self.pg_port),
                                        "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="],
                           user=user)
        _wait(lambda: subprocess.run([str(pg / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.pg_port)],
                                     timeout=5).returncode == 0, "postgres", proc, 60)
        import psycopg2

        base = f"postgresql://mlflow:{self.password}@127.0.0.1:{self.pg_port}"
        conn = psycopg2.connect(f"{base}/postgres")
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        self.postgres_uri = f"{base}/mlflow"  # libpq's form (psql, psycopg2.connect)

    def _s3(self) -> None:
        import boto3

        port = free_port()
        self.s3_endpoint = f"http://127.0.0.1:{port}"
        proc = self._start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)])
        _wait(lambda: _http_ok(f"{self.s3_endpoint}/moto-api/"), "moto_server", proc, 60)
        boto3.client("s3", endpoint_url=self.s3_endpoint, **_boto_credentials()).create_bucket(Bucket=self.bucket)

    def _mlflow(self) -> None:
        port = free_port()
        self.tracking_uri = f"http://127.0.0.1:{port}"
        env = {**os.environ, **CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint}
        proc = self._start("mlflow", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            # one process: uvicorn's multi-worker supervisor kills workers slower than 5 s to start (a loaded machine)
            "--workers", "1",
            # SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3: name the driver that is installed
            "--backend-store-uri", self.postgres_uri.replace("postgresql://", "postgresql+psycopg2://"),
            "--artifacts-destination", f"s3://{self.bucket}/mlflow", "--serve-artifacts",
            "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"], env=env)
        _wait(lambda: _http_ok(f"{self.tracking_uri}/health"), "mlflow server", proc, 180)  # migrations: ~10-30 s

    def start(self) -> LocalStack:
        try:
            self._postgres()
            self._s3()
            self._mlflow()
        except Exception as e:
            tail = self.log_tail()  # before stop() deletes the logs
            self.stop()
            raise RuntimeError(f"{e}\n{tail}") from e
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def env(self) -> dict[str, str]:
        """For the stages (MLFLOW_TRACKING_URI; artifacts go through the server) and DVC (the bucket's key)."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, **CREDENTIALS}

    def stop(self) -> None:
        """SIGTERM each process group (postgres: a fast shutdown), SIGKILL what is left after 20 s."""
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
        deadline = time.time() + 20
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of every process's log (for a failing test's message)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in self.log_dir.glob("*.log"))

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _boto_credentials() -> dict:
    return {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": CREDENTIALS["AWS_DEFAULT_REGION"]}


def main() -> None:
    # SIGTERM (and SIGINT where a shell started this ignoring it, `... &`) unwind through stop(), even mid-start
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    with LocalStack() as stack:
        print("# PostgreSQL, S3 (moto, in memory) and MLflow on 127.0.0.1; logs in", stack.log_dir)
        for key, value in stack.env.items():
            print(f"export {key}={value}")
        print(f"# DVC remote: dvc remote add -d storage s3://{stack.bucket}/dvc && "
              f"dvc remote modify storage endpointurl {stack.s3_endpoint}")
        print("# Ctrl-C stops everything and deletes its data", flush=True)
        signal.pause()


if __name__ == "__main__":
    main()
