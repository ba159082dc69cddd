"""The continuous-batching engine (components/serve/engine.py) vs one generate() call at a time, same model, same
process, same client threads: aggregate tokens/s, p50 latency and p50 time to first token at 1, 4, 16 and 32
concurrent clients. Each client sends its requests one after another (prompts of 16-48 random ids, a fixed number of
new tokens, no eos), half greedy and half seeded top-p sampling, so no two clients share sampling parameters.

    python benchmarks/bench_engine.py                      # the tiny profile's model (params.yaml), random weights
    python benchmarks/bench_engine.py --clients 1 4 --requests 3
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import types
from pathlib import Path

import torch

from components.common import REPO_ROOT, config_from_dict, load_yaml
from components.serve.engine import Engine
from model.config import ModelSpec, get_config
from model.generation import SamplingParams, generate
from model.llama import Transformer


def tiny_model(vocab_size: int | None = None) -> Transformer:
    """llama2-6m with params.yaml's model overrides (the tiny profile's shape), random weights; vocab_size None:
    the config's."""
    spec = config_from_dict(ModelSpec, load_yaml(Path(REPO_ROOT, "params.yaml").read_text())["model"], "model")
    args = spec.args(vocab_size=vocab_size or get_config(spec.config).vocab_size)
    return Transformer(args).init_weights(generator=torch.Generator().manual_seed(0)).eval()


def requests(client: int, n: int, new_tokens: int, vocab: int) -> list[tuple[list[int], SamplingParams]]:
    gen = torch.Generator().manual_seed(client)
    out = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (int(torch.randint(16, 49, (1,), generator=gen)),), generator=gen).tolist()
        params = (SamplingParams(max_new_tokens=new_tokens, temperature=0) if client % 2 == 0 else
                  SamplingParams(max_new_tokens=new_tokens, temperature=0.8, top_p=0.95, seed=client * 100 + i))
        out.append((prompt, params))
    return out


def run_clients(n_clients: int, per_client: int, new_tokens: int, vocab: int, serve) -> dict:
    """serve(prompt, params, on_first) -> generated ids; every client thread starts together."""
    latencies, ttfts, tokens = [], [], []
    barrier, lock = threading.Barrier(n_clients + 1), threading.Lock()

    def client(c: int) -> None:
        work = requests(c, per_client, new_tokens, vocab)
        barrier.wait()
        for prompt, params in work:
            start, first = time.perf_counter(), []
            ids = serve(prompt, params, lambda: first or first.append(time.perf_counter()))
            end = time.perf_counter()
            with lock:
                latencies.append(end - start)
                ttfts.append(first[0] - start)
                tokens.append(len(ids))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"tok_s": sum(tokens) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "ttft_ms": 1000 * statistics.median(ttfts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, sent one after another")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    opts = parser.parse_args()

    model = tiny_model()
    vocab = model.args.vocab_size
    gen_lock = threading.Lock()

    def serve_generate(prompt, params, on_first):  # the old path: one generate() call at a time
        with gen_lock, torch.inference_mode():
            return generate(model, [prompt], params, eos_id=-1, on_step=lambda ids, rows: on_first()).tokens[0]

    engine = Engine(model, types.SimpleNamespace(eos_id=-1, pad_id=0), max_batch_size=opts.max_batch_size)

    def serve_engine(prompt, params, on_first):
        return engine.submit(prompt, params, on_token=lambda token: on_first()).future.result().tokens

    args = model.args
    print(f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.kv_heads} heads, vocab {vocab}; "
          f"{opts.new_tokens} new tokens, {opts.requests} requests per client; torch threads "
          f"{torch.get_num_threads()}")
    run_clients(2, 1, 8, vocab, serve_generate)  # warm-up both paths
    run_clients(2, 1, 8, vocab, serve_engine)
    rows = []
    for n in opts.clients:
        old = run_clients(n, opts.requests, opts.new_tokens, vocab, serve_generate)
        new = run_clients(n, opts.requests, opts.new_tokens, vocab, serve_engine)
        rows.append((n, old, new))
    engine.close()

    base_old, base_new = rows[0][1]["tok_s"], rows[0][2]["tok_s"]
    print("\n| clients | generate tok/s | engine tok/s | engine / generate | engine vs its 1 client "
          "| p50 latency ms (gen / eng) | p50 TTFT ms (gen / eng) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, old, new in rows:
        print(f"| {n} | {old['tok_s']:.0f} | {new['tok_s']:.0f} | {new['tok_s'] / old['tok_s']:.2f}x "
              f"| {new['tok_s'] / base_new:.2f}x | {old['p50_ms']:.0f} / {new['p50_ms']:.0f} "
              f"| {old['ttft_ms']:.0f} / {new['ttft_ms']:.0f} |")
    print(f"\n(generate at 1 client: {base_old:.0f} tok/s)")


if __name__ == "__main__":
    main()
