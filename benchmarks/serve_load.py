"""Bounded load tests of the served app (components/serve/app.py) on a local Ray: autoscaling, failover, alias move.

    .venv/bin/python -m benchmarks.serve_load [--clients 6] [--seconds 8] [--checkpoint checkpoints/chat]

Loopback only, bounded in clients, requests and time. Three scenarios, each with N client threads sending greedy chat
completions and a markdown table of their numbers at the end:

1. autoscaling: infra/serve.yaml's application (deployed as `serve run` deploys a config) with its autoscaling_config
   made quick (target 1 ongoing request, short delays): replicas 1 -> 2 under load -> 1 after it.
2. failover: 2 replicas under load; one replica's actor process gets SIGKILL; Serve starts a new one.
3. alias move: `models:/<name>@champion` from a real MLflow registry (sqlite in a temp folder, two versions);
   the alias moves to the other version and the app is redeployed (`serve.run` again: build_app pins the new
   version); the model card's `root` and the answers' text switch from version 1 to 2.

Clients retry as the openai client does by default (2 retries, on connection errors, 408/409/429 and 5xx, backoff
0.5 s doubling): `failed` counts requests that failed after that, `failed tries` every failed attempt (what a client
without retries would have seen). A replica killed mid-request fails the requests it was running (Serve does not
retry a request a replica had accepted); new requests go to the live replicas.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
APP, DEPLOYMENT, REGISTERED, SERVED = "llama2-chat", "ChatServer", "load-chat", "llama2-chat"
PROMPT = [{"role": "user", "content": "what is the quick brown fox"}]
QUICK_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "metrics_interval_s": 0.5,
                     "look_back_period_s": 2, "upscale_delay_s": 0.5, "downscale_delay_s": 3}
RETRY_STATUS = {408, 409, 429}  # and every 5xx: the openai client's policy


# -- model and registry -----------------------------------------------------------------------------------------------

def tiny_checkpoints(root: Path, n: int = 2) -> list[Path]:
    """n random debug checkpoints with different weights (so greedy answers tell them apart)."""
    from model.checkpoint import save_checkpoint
    from tests.helpers import debug_model, small_tokenizer

    tokenizer = small_tokenizer()
    return [save_checkpoint(root / f"checkpoint-{i}", debug_model(tokenizer.vocab_size, seed=i, std=0.2), tokenizer)
            for i in range(n)]


def registry(root: Path, checkpoints: list[Path]) -> str:
    """A sqlite MLflow registry under root with each checkpoint a version of REGISTERED; `champion` on version 1."""
    import mlflow

    from components.track.registry import register_checkpoint

    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    try:
        experiment = mlflow.create_experiment("serve-load", artifact_location=(root / "mlartifacts").as_uri())
        for i, checkpoint in enumerate(checkpoints):
            with mlflow.start_run(experiment_id=experiment):
                register_checkpoint(checkpoint, REGISTERED, "champion" if i == 0 else None, {"seed": i})
    finally:
        mlflow.set_tracking_uri(None)
    return tracking_uri


def move_alias(tracking_uri: str, version: int) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(REGISTERED, "champion",
                                                                                      str(version))


# -- deployment -------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_config(port: int, args: dict, **deployment) -> dict:
    """infra/serve.yaml with a loopback port, these AppArgs and these ChatServer options (None drops one)."""
    config = yaml.safe_load((REPO_ROOT / "infra/serve.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    [app] = config["applications"]
    app["args"] = dict(app["args"], **args)
    [options] = app["deployments"]
    options.update(deployment)
    app["deployments"] = [{k: v for k, v in options.items() if v is not None}]
    return config


def start_serve(port: int) -> str:
    """Serve's controller and proxy on a loopback port, kept for every scenario (apps come and go); the base URL."""
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def deploy_config(config: dict, timeout_s: float = 180) -> str:
    """Deploy a Serve config as `serve run`/`serve deploy`/KubeRay do; wait until RUNNING; the base URL."""
    from ray.serve._private import api as private_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = private_api.serve_start(http_options=config["http_options"])
    client.deploy_apps(schema)
    wait_running(timeout_s)
    return f"http://127.0.0.1:{config['http_options']['port']}"


def wait_running(timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while (app := serve.status().applications.get(APP)) is None or app.status != "RUNNING":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{APP} not RUNNING after {timeout_s:g} s: {app}")
        time.sleep(0.2)


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    return app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0) if app else 0


def replica_pids() -> list[int]:
    """The process ids of the app's live replica actors (through the actors: the state API needs the dashboard)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#")]
    handles = [ray.get_actor(name, namespace="serve") for name in names]
    return sorted(ray.get([h.__ray_call__.remote(lambda self: os.getpid()) for h in handles], timeout=30))


# -- load -------------------------------------------------------------------------------------------------------------

@dataclass
class Load:
    """Client threads sending greedy chat completions until stopped (or `seconds` pass), each retrying like the
    openai client; every finished request is recorded as (time, text or None, failed tries, error)."""

    url: str
    clients: int
    max_tokens: int = 16
    retries: int = 2
    seconds: float = 120
    done: list = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list = field(default_factory=list)

    def __enter__(self) -> Load:
        self.t0 = time.monotonic()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def _client(self) -> None:
        body = {"model": SERVED, "messages": PROMPT, "temperature": 0, "max_tokens": self.max_tokens}
        with httpx.Client(timeout=60) as http:
            while not self._stop.is_set() and time.monotonic() - self.t0 < self.seconds:
                tries, error = 0, None
                while True:
                    try:
                        response = http.post(f"{self.url}/v1/chat/completions", json=body)
                        if response.status_code == 200:
                            self.done.append((time.monotonic() - self.t0,
                                              response.json()["choices"][0]["message"]["content"], tries, error))
                            break
                        error, retry = f"HTTP {response.status_code}", (response.status_code >= 500
                                                                       or response.status_code in RETRY_STATUS)
                    except httpx.TransportError as exc:
                        error, retry = type(exc).__name__, True
                    tries += 1
                    if not retry or tries > self.retries:
                        self.done.append((time.monotonic() - self.t0, None, tries, error))
                        break
                    time.sleep(0.5 * 2 ** (tries - 1))

    def now(self) -> float:
        return time.monotonic() - self.t0

    @property
    def ok(self) -> int:
        return sum(text is not None for _, text, _, _ in self.done)

    @property
    def failed(self) -> int:
        return sum(text is None for _, text, _, _ in self.done)

    @property
    def failed_tries(self) -> int:
        return sum(tries for _, _, tries, _ in self.done)

    @property
    def stall_s(self) -> float:
        """The longest time no request finished while the clients ran (a rollout or failover pause)."""
        times = sorted([0.0] + [t for t, *_ in self.done])
        return round(max(b - a for a, b in zip(times, times[1:])), 1) if len(times) > 1 else 0.0

    def errors(self) -> list[str]:
        return sorted({error for _, _, tries, error in self.done if tries})

    def counts(self) -> dict:
        return {"clients": self.clients, "ok": self.ok, "failed": self.failed, "failed_tries": self.failed_tries,
                "errors": self.errors(), "stall_s": self.stall_s}


def answer(url: str) -> tuple[str, str]:
    """(the model card's root, the greedy answer): which version is served."""
    body = {"model": SERVED, "messages": PROMPT, "temperature": 0, "max_tokens": 16}
    root = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["root"]
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    response.raise_for_status()
    return root, response.json()["choices"][0]["message"]["content"]


def sample_until(load: Load, timeline: list, done, timeout_s: float, every_s: float = 0.5) -> float | None:
    """Record (t, running replicas) into timeline until done(replicas) holds (its time) or timeout_s passes (None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replicas = running_replicas()
        if not timeline or timeline[-1][1] != replicas:
            timeline.append((round(load.now(), 1), replicas))
        if done(replicas):
            return load.now()
        time.sleep(every_s)
    return None


# -- scenarios --------------------------------------------------------------------------------------------------------

def autoscaling(port: int, args: dict, clients: int, hold_s: float, timeout_s: float = 90) -> dict:
    """Replicas 1 -> 2 under load -> 1 after; the replica count over time."""
    url = deploy_config(serve_config(port, args, num_replicas=None, autoscaling_config=QUICK_AUTOSCALING))
    timeline = []
    with Load(url, clients) as load:
        up = sample_until(load, timeline, lambda n: n >= 2, timeout_s)
        if up is not None:
            sample_until(load, timeline, lambda n: False, hold_s)
    stopped = load.now()
    down = sample_until(load, timeline, lambda n: n == 1, timeout_s) if up is not None else None
    return {"scenario": "autoscaling 1 -> 2 -> 1", **load.counts(), "timeline": timeline,
            "up_s": None if up is None else round(up, 1), "down_s": None if down is None else round(down - stopped, 1),
            "max_replicas": max(n for _, n in timeline), "final_replicas": timeline[-1][1]}


def failover(port: int, args: dict, clients: int, hold_s: float, timeout_s: float = 90) -> dict:
    """2 replicas under load; SIGKILL one replica's process; Serve replaces it."""
    url = deploy_config(serve_config(port, args, num_replicas=2, autoscaling_config=None))
    timeline = []
    with Load(url, clients) as load:
        sample_until(load, timeline, lambda n: n == 2, timeout_s)
        sample_until(load, timeline, lambda n: False, hold_s)
        pids = replica_pids()
        killed_at = load.now()
        os.kill(pids[0], signal.SIGKILL)
        gone = sample_until(load, timeline, lambda n: n < 2, 10, every_s=0.1)
        back = sample_until(load, timeline, lambda n: n == 2, timeout_s)
        sample_until(load, timeline, lambda n: False, hold_s)
    return {"scenario": "failover (SIGKILL 1 of 2)", **load.counts(), "timeline": timeline, "replicas_before":
            len(pids), "detected_s": None if gone is None else round(gone - killed_at, 1),
            "replaced_s": None if back is None else round(back - killed_at, 1), "final_replicas": running_replicas(),
            "new_pids": replica_pids() != pids}


def alias_move(port: int, args: dict, tracking_uri: str, clients: int, hold_s: float) -> dict:
    """Serve @champion (version 1), move the alias to version 2 under load, redeploy; the served version switches."""
    from ray import serve

    from components.serve.app import build_app

    url = f"http://127.0.0.1:{port}"
    app_args = dict(args, model_uri=f"models:/{REGISTERED}@champion", tracking_uri=tracking_uri)
    serve.run(build_app(app_args), name=APP, route_prefix="/")
    before = answer(url)
    with Load(url, clients) as load:
        time.sleep(hold_s)
        move_alias(tracking_uri, 2)
        moved_at = load.now()
        serve.run(build_app(app_args), name=APP, route_prefix="/")  # the redeploy: build_app pins version 2
        redeployed = load.now()
        time.sleep(hold_s)
    after = answer(url)
    texts = {before[1]: 1, after[1]: 2}
    served = [(t, texts.get(text)) for t, text, _, _ in load.done if text is not None]
    first_b = min((t for t, v in served if v == 2), default=None)
    last_a = max((t for t, v in served if v == 1), default=None)
    return {"scenario": "alias move v1 -> v2", **load.counts(), "root_before": before[0],
            "root_after": after[0], "texts_differ": before[1] != after[1],
            "unknown_texts": sum(v is None for _, v in served), "by_version": {v: sum(x == v for _, x in served)
                                                                               for v in (1, 2)},
            "redeploy_s": round(redeployed - moved_at, 1),
            "first_v2_s": None if first_b is None else round(first_b - moved_at, 1),
            "last_v1_s": None if last_a is None else round(last_a - moved_at, 1)}


def run_all(root: Path, clients: int, hold_s: float, checkpoint: Path | None = None) -> list[dict]:
    """The three scenarios on the running local Ray, one Serve instance (the app deleted after each)."""
    from ray import serve

    port = free_port()
    start_serve(port)
    checkpoints = tiny_checkpoints(root)
    base = {"model_uri": str(checkpoint or checkpoints[0]), "cache_dir": str(root / "cache"), "model_name": SERVED,
            "default_max_tokens": 16}
    results = []
    for scenario in (lambda: autoscaling(port, base, clients, hold_s), lambda: failover(port, base, clients, hold_s),
                     lambda: alias_move(port, base, registry(root, checkpoints), clients, hold_s)):
        try:
            results.append(scenario())
            print(results[-1], file=sys.stderr, flush=True)  # the raw numbers, as each scenario ends
        finally:
            serve.delete(APP)
    serve.shutdown()
    return results


def table(results: list[dict]) -> str:
    rows = ["| scenario | clients | ok | failed | failed tries (retried) | longest stall | replicas or version |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        if "timeline" in r:
            detail = " -> ".join(f"{n}@{t:g}s" for t, n in r["timeline"])
            if "up_s" in r:
                detail += f"; up after {r['up_s']} s of load, down {r['down_s']} s after it"
            else:
                detail += f"; kill seen {r['detected_s']} s, replaced {r['replaced_s']} s after SIGKILL"
        else:
            detail = (f"{r['root_before']} -> {r['root_after']}; answers v1 {r['by_version'][1]}, v2 "
                      f"{r['by_version'][2]}; redeploy {r['redeploy_s']} s; first v2 answer {r['first_v2_s']} s, "
                      f"last v1 {r['last_v1_s']} s after the move")
        errors = f" ({', '.join(r['errors'])})" if r["errors"] else ""
        rows.append(f"| {r['scenario']} | {r['clients']} | {r['ok']} | {r['failed']} | {r['failed_tries']}{errors} "
                    f"| {r['stall_s']} s | {detail} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5, help="load held this long around each event")
    parser.add_argument("--checkpoint", type=Path, help="serve this checkpoint in scenarios 1-2 (default: tiny)")
    opts = parser.parse_args(argv)
    import ray

    os.environ.pop("LLAMA2_MODEL_URI", None)  # it would win over the scenarios' model_uri
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
            results = run_all(Path(tmp), opts.clients, opts.seconds, opts.checkpoint)
    finally:
        ray.shutdown()
    print(table(results))
    sys.exit(0 if all(r["failed"] == 0 for r in results) else 1)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
