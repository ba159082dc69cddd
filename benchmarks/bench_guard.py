"""The serve-time safety guard (components/serve/guard.py), measured on a pipeline's outputs: its effect on the
held-out harmful and benign look-alike eval prompts, and its latency cost per request.

Rates: greedy answers of the chat model to every eval_prompts row of task harmful and benign_lookalike (as the
evaluate stage decodes them: max_new_tokens 32, the text stripped), then the guard's screen in-process (the same
object and call the server makes); the oracle's is_refusal on the final text gives the refusal rate (harmful: higher is
better) and the false-refusal rate (benign look-alikes: lower is better) without and with the guard, with 95% Wilson
intervals, and the share of answers the guard replaced. Latency: one request's path at batch 1 (generate, then the
guard's judge of its answer), p50 over --requests prompts, after a warm-up.

Run after the pipeline, from the repo root (defaults: checkpoints/chat, the final round's rm_safety and its chosen
threshold, data/raw/eval_prompts.parquet):

    .venv/bin/python -m benchmarks.bench_guard [--chat DIR] [--rm DIR] [--threshold P] [--out reports/guard.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from components.data.datasets import read_table
from components.data.oracle import REFUSAL, is_refusal
from components.rlhf.stats import wilson
from components.serve.guard import CONTENT_FILTER, SafetyGuard, threshold_for
from model.chat import encode_prompt
from model.checkpoint import load_checkpoint
from model.generation import SamplingParams, generate

TASKS = {"harmful": "refusal rate", "benign_lookalike": "false-refusal rate"}


def default_rm() -> str:
    from flows._stage import final_round, load_params

    return f"checkpoints/{final_round(load_params())}/rm_safety"


def answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    out = []
    for start in range(0, len(prompts), batch_size):
        with torch.no_grad():
            result = generate(model, prompts[start:start + batch_size],
                              SamplingParams(max_new_tokens=max_new_tokens, temperature=0), tokenizer.eos_id,
                              tokenizer.pad_id)
        out += [tokenizer.decode(t).strip() for t in result.tokens]
    return out


def rate(hits: list[bool]) -> dict:
    lo, hi = wilson(sum(hits), len(hits))
    return {"rate": sum(hits) / max(len(hits), 1), "ci": [lo, hi], "n": len(hits)}


def measure(chat: str, rm: str, prompts_file: str, threshold: float | None, max_new_tokens: int, batch_size: int,
            requests: int) -> dict:
    model, tok = load_checkpoint(chat)
    rm_model, rm_tok = load_checkpoint(rm)
    value, source = threshold_for(rm, threshold)
    guard = SafetyGuard(rm_model, rm_tok, value, REFUSAL)
    rows = [r for r in read_table(prompts_file).to_pylist() if r["task"] in TASKS]
    if not rows:
        raise SystemExit(f"error: {prompts_file} has no rows of task {' or '.join(TASKS)}")
    dialogs = [json.loads(r["prompt"]) for r in rows]
    ids = [encode_prompt(tok, d) for d in dialogs]
    texts = answers(model, tok, ids, max_new_tokens, batch_size)
    guarded = [guard.screen(d, [(t, 0, "stop", None)])[0] for d, t in zip(dialogs, texts)]
    result = {"chat": chat, "rm": rm, "threshold": value, "threshold_source": source,
              "max_new_tokens": max_new_tokens, "tasks": {}}
    for task, what in TASKS.items():
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        result["tasks"][task] = {
            "metric": what, "without_guard": rate([is_refusal(texts[i]) for i in idx]),
            "with_guard": rate([is_refusal(guarded[i][0]) for i in idx]),
            "replaced": rate([guarded[i][2] == CONTENT_FILTER for i in idx])}

    # One request's path at batch 1: generate, then the guard's judge (what the server adds after generation).
    order = [i for pair in zip(*[[i for i, r in enumerate(rows) if r["task"] == t] for t in TASKS]) for i in pair]
    order = (order or list(range(len(rows))))[:requests + 1]
    gen_ms, guard_ms = [], []
    for n, i in enumerate(order):
        t0 = time.perf_counter()
        [text] = answers(model, tok, [ids[i]], max_new_tokens, 1)
        t1 = time.perf_counter()
        guard.judge(dialogs[i], [text])
        t2 = time.perf_counter()
        if n:  # the first is the warm-up
            gen_ms.append((t1 - t0) * 1e3)
            guard_ms.append((t2 - t1) * 1e3)
    if gen_ms:
        gen, cost = statistics.median(gen_ms), statistics.median(guard_ms)
        result["latency_ms_p50"] = {"generation": gen, "guard": cost, "overhead": cost / gen,
                                    "requests": len(gen_ms)}
    return result


def table(result: dict) -> str:
    lines = [f"safety guard: {result['rm']} threshold {result['threshold']:.3f} ({result['threshold_source']}); "
             f"chat {result['chat']}, greedy, max_new_tokens {result['max_new_tokens']}",
             "| task | metric | n | without guard [95% CI] | with guard [95% CI] | replaced |",
             "|---|---|---:|---|---|---:|"]
    for task, r in result["tasks"].items():
        cell = lambda m: f"{m['rate']:.2f} [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}]"  # noqa: E731
        lines.append(f"| {task} | {r['metric']} | {r['without_guard']['n']} | {cell(r['without_guard'])} | "
                     f"{cell(r['with_guard'])} | {r['replaced']['rate']:.2f} |")
    if lat := result.get("latency_ms_p50"):
        lines.append(f"latency p50 per request (batch 1, {lat['requests']} requests): generation "
                     f"{lat['generation']:.1f} ms, guard {lat['guard']:.1f} ms (+{100 * lat['overhead']:.0f}%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chat", default="checkpoints/chat")
    parser.add_argument("--rm", default=None, help="the safety RM folder (default: the final round's rm_safety)")
    parser.add_argument("--prompts", default="data/raw/eval_prompts.parquet")
    parser.add_argument("--threshold", type=float, default=None, help="default: the RM's threshold.json, else 0.15")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20, help="batch-1 requests timed (after one warm-up)")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    for name, value in (("--chat", args.chat), ("--prompts", args.prompts)):
        if not Path(value).exists():
            raise SystemExit(f"error: {name} {value} does not exist: run the pipeline first (dvc repro)")
    result = measure(args.chat, args.rm or default_rm(), args.prompts, args.threshold, args.max_new_tokens,
                     args.batch_size, args.requests)
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
