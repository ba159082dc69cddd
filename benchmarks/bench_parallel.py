"""ray.strategy on real Ray Train: the LM loop under ddp and fsdp (FSDP2) on 1 and 2 workers, same global batch.

Per run: training tokens/s (steady state, the loop's own tokens_per_s at its last log), final val_loss (the
strategies must agree), and the bytes of training state one worker holds (parameters + gradients + AdamW moments),
counted from that worker's local tensors: under fsdp each worker holds ~1/N of it, under ddp all of it.

    python -m benchmarks.bench_parallel                       # CPU, gloo, the tiny profile's network
    python -m benchmarks.bench_parallel --steps 40 --overrides "{}"   # the full llama2-6m
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from components.cluster import RayConfig
from components.data.packing import pack_documents
from components.train.lm import LMTrainConfig, train_lm
from model.config import get_config
from tests.helpers import corpus, small_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="llama2-6m")
    parser.add_argument("--overrides", default='{"dim": 192, "n_layers": 4, "n_heads": 6, "n_kv_heads": 2}',
                        help="ModelArgs overrides as JSON (default: the tiny profile's network)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    tok = small_tokenizer()  # 512 pieces: what the test corpus supports
    model_args = get_config(args.config, vocab_size=tok.vocab_size, max_seq_len=args.seq_len,
                            **json.loads(args.overrides))
    packed = pack_documents([tok.encode(t) for t in corpus(20000, seed=1)], args.seq_len, tok.bos_id, tok.eos_id)
    n = packed["inputs"].shape[0]
    train, val = {k: v[:n - 16] for k, v in packed.items()}, {k: v[n - 16:] for k, v in packed.items()}
    cfg = LMTrainConfig(seq_len=args.seq_len, lr=1e-3, warmup_steps=5, max_steps=args.steps, batch_size=args.batch,
                        micro_batch_size=args.batch // 2, bf16=True, eval_every=10_000, log_every=10,
                        checkpoint_every=10_000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(Path(tmp) / "tokenizer.model")
        init = {"args": model_args.to_dict(), "tokenizer": str(Path(tmp) / "tokenizer.model"), "seed": 0}
        for strategy, workers in (("ddp", 1), ("ddp", 2), ("fsdp", 2)):
            ray = RayConfig(num_workers=workers, cpus_per_worker=1, strategy=strategy, local_num_cpus=4,
                            storage_path=str(Path(tmp) / "ray"))
            out = Path(tmp) / f"{strategy}{workers}"
            metrics = train_lm(init, train, val, replace(cfg, ray=ray), f"bench-{strategy}{workers}", out)
            history = json.loads((out / "trainer_state/history.json").read_text())
            speed = [r["tokens_per_s"] for r in history if "tokens_per_s" in r][-1]
            rows.append((strategy, workers, speed, metrics["val_loss"], metrics["state_bytes_per_worker"]))
    print(f"\n{args.config} {json.loads(args.overrides)}, seq {args.seq_len}, global batch {args.batch}, "
          f"{args.steps} steps, 1 CPU thread per worker, bf16 autocast where native\n")
    print("| strategy | workers | tokens/s | val_loss | training state per worker (MB) |\n|---|---:|---:|---:|---:|")
    for strategy, workers, speed, loss, state in rows:
        print(f"| {strategy} | {workers} | {speed:,.0f} | {loss:.4f} | {state / 1e6:.1f} |")


if __name__ == "__main__":
    main()
