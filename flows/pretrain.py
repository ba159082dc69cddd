"""DVC stage `pretrain`: the base model on the packed clean corpus (Ray Train) -> checkpoints/base/.

From scratch by default; with model.hf_weights (a LlamaForCausalLM folder such as Llama-2-7b-hf) training continues
from those weights, and pretrain.max_steps 0 just imports them."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from components.data.token_blocks import pretrain_data
from components.train.lm import PretrainConfig, scratch_blocks, train_lm
from components.track.tracking import stage_run
from flows._stage import finish_stage, load_params, path, run_stage, stage_config, write_metrics
from model.checkpoint import atomic_dir
from model.tokenizer import Tokenizer

OUT = path("checkpoints/base")


def main() -> None:
    params = load_params()
    cfg = stage_config(params, "pretrain", PretrainConfig, nested=("model",))
    tokenizer_path = path("artifacts/tokenizer/tokenizer.model")
    args = cfg.model.args(Tokenizer.load(tokenizer_path).vocab_size)
    args = args.replace(max_seq_len=max(cfg.seq_len, cfg.model.overrides.get("max_seq_len", cfg.seq_len)))
    with (stage_run("pretrain", {**asdict(cfg), "model_args": args.to_dict()}, params["profile"],
                    [path("data/clean"), path("artifacts/tokenizer")], OUT) as run,
          tempfile.TemporaryDirectory() as tmp, scratch_blocks(cfg.ray, "pretrain") as blocks_uri):
        if cfg.model.hf_weights:
            from model.hf import import_hf

            if cfg.max_steps == 0:  # import only
                with atomic_dir(OUT) as out:
                    import_hf(cfg.model.hf_weights, out, max_seq_len=args.max_seq_len)
                write_metrics("pretrain", {"imported_from": str(cfg.model.hf_weights), "train_tokens": 0})
                return
            init = {"checkpoint": str(Path(tmp) / "imported")}
            import_hf(cfg.model.hf_weights, init["checkpoint"], max_seq_len=args.max_seq_len)
            tokenizer_path = Path(init["checkpoint"]) / "tokenizer.model"  # the weights' own vocabulary, not ours
        else:
            init = {"args": args.to_dict(), "tokenizer": str(tokenizer_path), "seed": cfg.seed}
        # The packed rows stream to the workers from token blocks in Ray's storage (removed after the run).
        blocks, val = pretrain_data(path("data/clean"), tokenizer_path, cfg.seq_len, cfg.val_fraction, blocks_uri)
        print(f"[pretrain] {blocks.n_rows * cfg.seq_len:,} training tokens in {blocks.n_rows} rows of {cfg.seq_len}")
        metrics = train_lm(init, blocks, val, cfg, "pretrain", OUT, run.info.run_id)
        metrics["train_tokens"] = blocks.n_rows * cfg.seq_len
        finish_stage("pretrain", metrics, OUT)

if __name__ == "__main__":
    run_stage(main)
