"""The served endpoint under load (loopback, a local Ray, the real app of components/serve/app.py): Serve's overhead
over calling `generate` directly at batch 1 (same prompt, same max_tokens, greedy; the median latency ratio - 1),
then aggregate tokens/s, p50/p99 latency and p50 time to first token (streamed) at 1, 4, 16 and 32 concurrent
clients, and where the CPU went: CPU ms per generated token in the clients (this process), Serve's HTTP proxy and the
replica, and how busy the machine's cores were (the clients share them with the server here). Each client sends its
requests one after another (/v1/completions, prompts of 16-48 random ids), half greedy and half seeded top-p
sampling, so no two clients share sampling parameters. Prints a markdown table.

    .venv/bin/python -m benchmarks.bench_serve                      # tiny profile's shape (params.yaml), random weights
    .venv/bin/python -m benchmarks.bench_serve --checkpoint PATH    # a checkpoint folder (the pipeline's chat model)
    .venv/bin/python -m benchmarks.bench_serve --torch-threads 1 2  # one table per replica thread setting

Targets (issue 12): 16 clients >= 6x one client's tokens/s; TTFT p50 at 16 clients <= 2x one client's;
overhead <= 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import ray
import torch
from ray import serve

from components.common import REPO_ROOT, config_from_dict, load_yaml
from components.serve.app import build_app
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelSpec
from model.generation import SamplingParams, generate
from model.llama import Transformer

ROOT = str(Path(__file__).resolve().parents[1])  # this checkout: Ray's workers import the app from it too


def random_checkpoint(folder: Path) -> Path:
    """llama2-6m with params.yaml's model overrides (the tiny profile's shape), random weights, and the tests' small
    tokenizer (vocabulary 512, the most their corpus gives; the tiny profile's is 2048: a smaller output layer)."""
    from model.tokenizer import train_tokenizer
    from tests.helpers import corpus

    tokenizer = train_tokenizer(corpus(), 512)
    spec = config_from_dict(ModelSpec, load_yaml(Path(REPO_ROOT, "params.yaml").read_text())["model"], "model")
    model = Transformer(spec.args(vocab_size=tokenizer.vocab_size))
    model.init_weights(generator=torch.Generator().manual_seed(0)).eval()
    return save_checkpoint(folder / "checkpoint", model, tokenizer)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(checkpoint: Path, threads: int, max_batch_size: int, stream_interval_s: float | None = None) -> None:
    args = {"model_uri": str(checkpoint), "max_batch_size": max_batch_size, "torch_threads": threads,
            "max_ongoing_requests": 64, "request_timeout_s": 600}
    if stream_interval_s is not None:
        args["stream_interval_s"] = stream_interval_s
    app = build_app(args)
    serve.run(app, name="bench", route_prefix="/", blocking=False)
    deadline = time.monotonic() + 300
    while serve.status().applications["bench"].status != "RUNNING":
        if time.monotonic() > deadline:
            raise TimeoutError(serve.status())
        time.sleep(0.5)


def overhead(url: str, checkpoint: Path, threads: int, new_tokens: int, reps: int) -> tuple[float, ...]:
    """(median direct generate s, median served s, ratio - 1, median GET /v1/models s: Serve's round trip without
    a decode), interleaved (a loaded machine drifts)."""
    torch.set_num_threads(threads)
    model, tokenizer = load_checkpoint(checkpoint)
    prompt = tokenizer.encode("the quick brown fox jumps over the lazy dog", bos=True)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0}
    direct, served, trip = [], [], []
    with httpx.Client(base_url=url, timeout=120) as http, torch.inference_mode():
        for i in range(reps + 2):
            t0 = time.perf_counter()
            out = generate(model, [prompt], params, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
            t1 = time.perf_counter()
            reply = http.post("/v1/completions", json=body)
            t2 = time.perf_counter()
            http.get("/v1/models").raise_for_status()
            t3 = time.perf_counter()
            reply.raise_for_status()
            assert reply.json()["usage"]["completion_tokens"] == len(out.tokens[0]), "the two paths differ"
            if i >= 2:  # warm-up
                direct.append(t1 - t0)
                served.append(t2 - t1)
                trip.append(t3 - t2)
    d, s = statistics.median(direct), statistics.median(served)
    return d, s, s / d - 1, statistics.median(trip)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process (the clients), Serve's HTTP proxy and the replicas (by Ray's process
    titles)."""
    mine = psutil.Process().cpu_times()
    out = {"clients": mine.user + mine.system, "proxy": 0.0, "replica": 0.0}
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        role = "proxy" if "ProxyActor" in title else "replica" if "ServeReplica" in title else None
        if role:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                out[role] += times.user + times.system
    return out


async def clients(url: str, n: int, per_client: int, new_tokens: int, vocab: int) -> dict:
    latencies, ttfts, tokens = [], [], []

    async def client(c: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(c)
        for i in range(per_client):
            body = {"prompt": [rng.randrange(3, vocab) for _ in range(rng.randint(16, 48))],
                    "max_tokens": new_tokens, "stream": True, "stream_options": {"include_usage": True}}
            body |= {"temperature": 0} if c % 2 == 0 else {"temperature": 0.8, "top_p": 0.95, "seed": c * 100 + i}
            t0, first = time.perf_counter(), None
            async with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if first is None and event["choices"]:
                        first = time.perf_counter()
                    if event.get("usage"):
                        tokens.append(event["usage"]["completion_tokens"])
            latencies.append(time.perf_counter() - t0)
            ttfts.append((first or time.perf_counter()) - t0)

    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        cpu, start = cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(n)))
        wall = time.perf_counter() - start
        cpu = {role: used - cpu[role] for role, used in cpu_seconds().items()}
    latencies.sort()
    return {"tok_s": sum(tokens) / wall, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
            "ttft": statistics.median(ttfts), "cpu_ms_per_token": {r: 1000 * c / sum(tokens) for r, c in cpu.items()},
            "busy_cores": sum(cpu.values()) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: random weights)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=3, help="requests per client, sent one after another")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--overhead-reps", type=int, default=20)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, nargs="+", default=[1], help="the replica's torch threads")
    parser.add_argument("--stream-interval-s", type=float, help="the app's stream_interval_s (default: its default)")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = opts.checkpoint or random_checkpoint(Path(tmp))
        vocab = load_checkpoint(checkpoint)[0].args.vocab_size
        port = _free_port()
        pythonpath = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        try:
            for threads in opts.torch_threads:
                deploy(checkpoint, threads, opts.max_batch_size, opts.stream_interval_s)
                asyncio.run(clients(url, 2, 1, 8, vocab))  # warm-up
                d, s, ratio, trip = overhead(url, checkpoint, threads, opts.new_tokens, opts.overhead_reps)
                rows = [(n, asyncio.run(clients(url, n, opts.requests, opts.new_tokens, vocab)))
                        for n in opts.clients]
                base = rows[0][1]
                interval = "default" if opts.stream_interval_s is None else opts.stream_interval_s
                print(f"\nreplica torch threads {threads}, max_batch_size {opts.max_batch_size}, {opts.new_tokens} "
                      f"new tokens, {opts.requests} requests per client, stream_interval_s {interval}; overhead at "
                      f"batch 1: generate "
                      f"{1000 * d:.1f} ms, served {1000 * s:.1f} ms, **{100 * ratio:+.1f}%** "
                      f"(GET /v1/models round trip {1000 * trip:.1f} ms)")
                print("\n| clients | tokens/s | vs 1 client | p50 latency ms | p99 latency ms | p50 TTFT ms "
                      "| TTFT vs 1 client | CPU ms/token: clients / proxy / replica | busy cores |")
                print("|---:|---:|---:|---:|---:|---:|---:|---|---:|")
                for n, r in rows:
                    cpu = " / ".join(f"{r['cpu_ms_per_token'][k]:.2f}" for k in ("clients", "proxy", "replica"))
                    print(f"| {n} | {r['tok_s']:.0f} | {r['tok_s'] / base['tok_s']:.2f}x | {1000 * r['p50']:.0f} "
                          f"| {1000 * r['p99']:.0f} | {1000 * r['ttft']:.0f} | {r['ttft'] / base['ttft']:.2f}x "
                          f"| {cpu} | {r['busy_cores']:.2f} |", flush=True)
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
