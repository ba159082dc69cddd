"""Our Llama vs transformers' LlamaForCausalLM (attn "sdpa"), same weights, same threads, one run.

Measures training tokens/s (forward + backward + AdamW) in fp32 and bf16 autocast, and KV-cache decode tokens/s at
batch 1 and 16 (greedy, a fixed number of new tokens) against transformers' `generate`; prints the ratios and the
model FLOPs utilisation against a matmul peak measured here. Our decode runs compiled (generate(compile=True), its
first call's time printed apart); our training step eagerly unless --compile-train.

    python benchmarks/bench_model.py                    # CPU, the ~6.5M llama2-6m config
    python benchmarks/bench_model.py --device cuda --config llama2-125m --dtypes bf16
    python benchmarks/bench_model.py --compile-train    # training compiled too
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from model.config import get_config
from model.generation import SamplingParams, generate
from model.hf import args_to_hf_config, meta_to_hf_state_dict
from model.llama import Transformer


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best-of-reps FLOP/s of an n x n matmul; on CPU the better of torch's (MKL for fp32) and oneDNN's (which our
    fp32 products use: model/matmul.py), so no MFU can exceed 100%."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    kernels = [lambda: a @ b]
    if device == "cpu" and torch.backends.mkldnn.is_available():
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for kernel in kernels:
        for _ in range(reps + 2):
            sync(device)
            t0 = time.perf_counter()
            kernel()
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def train_flops_per_token(args, seq_len: int) -> float:
    """6 N (matmul weights: every linear incl. the output head) + attention scores and values, fwd+bwd."""
    n_matmul = args.n_layers * (2 * args.dim * args.dim + 2 * args.dim * args.kv_heads * args.head_dim
                                + 3 * args.dim * args.ffn_hidden_dim) + args.dim * args.vocab_size
    return 6 * n_matmul + 12 * args.n_layers * args.dim * seq_len


def build_models(config: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    args = get_config(config)
    ours = Transformer(args).init_weights(generator=torch.Generator().manual_seed(0)).to(device)
    hf_config = LlamaConfig(**{k: v for k, v in args_to_hf_config(args).items() if k not in ("architectures",)})
    hf_config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_config).to(device)
    hf.load_state_dict(meta_to_hf_state_dict(ours.state_dict(), args))
    return args, ours, hf


def time_training(model, is_hf: bool, batch: torch.Tensor, autocast: bool, device: str, steps: int) -> list[float]:
    """Seconds per step for `steps` steps, after two warm-up steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    times = []
    for step in range(steps + 2):
        sync(device)
        t0 = time.perf_counter()
        # Each implementation's own loss path: transformers' ForCausalLMLoss (targets passed pre-shifted so both
        # score the same T positions) and our fused linear cross-entropy.
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            if is_hf:
                loss = model(input_ids=inputs, labels=targets, shift_labels=targets).loss
            else:
                loss = model(inputs, targets=targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    return times


def time_decode(model, is_hf: bool, prompts: torch.Tensor, new_tokens: int, autocast: bool, device: str,
                reps: int) -> list[float]:
    """Seconds per generate call for 1 + reps calls; the first is a warm-up (it compiles ours)."""
    times = []
    for rep in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast), torch.inference_mode():
            if is_hf:
                out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
                n = out.shape[1] - prompts.shape[1]
            else:
                # compile=True: a benchmark is the long-running process that amortises compiling.
                out = generate(model, prompts.tolist(), SamplingParams(max_new_tokens=new_tokens, temperature=0),
                               eos_id=-1, compile=True)
                n = len(out.tokens[0])
        sync(device)
        assert n == new_tokens, f"generated {n} tokens, expected {new_tokens}"
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama2-6m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="training batch (sequences)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="ours/theirs alternate this many times (noise)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--decode-batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--compile-train", action="store_true",
                        help="torch.compile our training step (LMTrainConfig.compile); decode always compiles")
    parser.add_argument("--json", help="also write the results here")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    device = opts.device
    args, ours, hf = build_models(opts.config, device)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"config {opts.config}: {n_params:,} parameters, device {device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()))
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(3, args.vocab_size, (opts.batch, opts.seq_len + 1), generator=gen).to(device)
    tokens_per_step = opts.batch * opts.seq_len
    flops_per_token = train_flops_per_token(args, opts.seq_len)
    rows = []
    for dtype in filter(None, opts.dtypes.split(",")):  # --dtypes "": decode only
        autocast = dtype == "bf16"
        ours_t, hf_t = [], []
        ours_train = torch.compile(ours) if opts.compile_train else ours  # same parameters
        for _ in range(opts.rounds):  # alternate so machine noise hits both
            ours_t += time_training(ours_train, False, batch, autocast, device, opts.steps)
            hf_t += time_training(hf, True, batch, autocast, device, opts.steps)
        ours_tps, hf_tps = tokens_per_step / statistics.median(ours_t), tokens_per_step / statistics.median(hf_t)
        name = f"train {dtype}" + (" compiled" if opts.compile_train else "")
        rows.append({"bench": name, "ours": ours_tps, "transformers": hf_tps, "ratio": ours_tps / hf_tps,
                     "mfu_ours": ours_tps * flops_per_token / peaks[dtype],
                     "mfu_transformers": hf_tps * flops_per_token / peaks[dtype]})
    for decode_batch in [int(b) for b in opts.decode_batches.split(",") if b]:  # "": training only
        prompts = torch.randint(3, args.vocab_size, (decode_batch, opts.prompt_len), generator=gen).to(device)
        autocast = device == "cuda"
        ours_t, hf_t = [], []
        for round_ in range(opts.rounds):
            times = time_decode(ours, False, prompts, opts.new_tokens, autocast, device, 2)
            if round_ == 0:
                print(f"decode b{decode_batch}: our first call {times[0]:.2f} s (compiling), then {times[1]:.3f} s")
            ours_t += times[1:]
            hf_t += time_decode(hf, True, prompts, opts.new_tokens, autocast, device, 2)[1:]
        n = decode_batch * opts.new_tokens
        ours_tps, hf_tps = n / statistics.median(ours_t), n / statistics.median(hf_t)
        rows.append({"bench": f"decode b{decode_batch}" + (" bf16" if autocast else " fp32"), "ours": ours_tps,
                     "transformers": hf_tps, "ratio": ours_tps / hf_tps})
    print(f"\n| benchmark | ours tok/s | transformers tok/s | ratio | MFU ours | MFU transformers |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = (f"{r['mfu_ours']:.1%} | {r['mfu_transformers']:.1%}" if "mfu_ours" in r else "– | –")
        print(f"| {r['bench']} | {r['ours']:,.0f} | {r['transformers']:,.0f} | {r['ratio']:.2f}× | {mfu} |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"config": opts.config, "device": device, "params": n_params, "peaks": peaks, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
