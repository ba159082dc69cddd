"""Where an Engine step's time goes (components/serve/engine.py, no Serve): the engine's pieces wrapped in timers
while N client threads each send requests one after another (bench_engine's load: prompts of 16-48 random ids, no
eos, half greedy and half seeded top-p). Prints the decode thread's CPU ms per decode step for each piece (CPU
time: comparable on a loaded machine, where wall time is not), at each client count.

    .venv/bin/python -m benchmarks.profile_engine --clients 1 16
    .venv/bin/python -m benchmarks.profile_engine --clients 16 --cprofile   # + cProfile of the decode thread
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import threading
import time
import types

import torch

from benchmarks.bench_engine import requests, tiny_model
from components.serve import engine as engine_module
from components.serve.engine import Engine

PIECES = {  # name -> (object, attribute): each call's wall time is summed under the name
    "forward (decode_step)": (engine_module, "decode_step"),
    "prefill": (engine_module, "prefill"),
    "sample_rows": (engine_module, "sample_rows"),
    "_sample (all)": (Engine, "_sample"),
    "_admit (all)": (Engine, "_admit"),
    "_step (all)": (Engine, "_step"),
    "_drop_done": (Engine, "_drop_done"),
}


def timed(totals: collections.Counter, name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.thread_time()  # CPU time: a loaded machine stretches wall time, not this
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.thread_time() - t0
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512, help="bench_serve's tokenizer size")
    parser.add_argument("--cprofile", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    model = tiny_model(opts.vocab)
    totals: collections.Counter = collections.Counter()
    for name, (owner, attr) in PIECES.items():
        setattr(owner, attr, timed(totals, name, getattr(owner, attr)))
    profiler = cProfile.Profile() if opts.cprofile else None
    if profiler:  # the decode thread's whole run
        run_engine = Engine._run
        Engine._run = lambda self: profiler.runcall(run_engine, self)
    engine = Engine(model, types.SimpleNamespace(eos_id=-1, pad_id=0), max_batch_size=32)

    def run(n: int) -> float:
        def client(c: int) -> None:
            for prompt, params in requests(c, opts.requests, opts.new_tokens, opts.vocab):
                engine.submit(prompt, params, on_token=lambda token: None).future.result()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    run(2)  # warm-up
    for n in opts.clients:
        totals.clear()
        steps0, tokens0 = engine.stats().steps, engine.stats().tokens
        clock = time.pthread_getcpuclockid(engine._thread.ident)
        cpu0 = time.clock_gettime(clock)
        wall = run(n)
        cpu = time.clock_gettime(clock) - cpu0
        steps, tokens = engine.stats().steps - steps0, engine.stats().tokens - tokens0
        print(f"\n{n} clients: {tokens / wall:.0f} tok/s, {steps} steps, {tokens / steps:.1f} rows a step, "
              f"{1000 * wall / steps:.2f} ms a step (wall), decode thread CPU {1000 * cpu / steps:.2f} ms a step")
        for name in PIECES:
            print(f"  {name:24s} {1000 * totals[name] / steps:6.2f} ms/step (CPU)")
    engine.close()
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
