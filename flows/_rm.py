"""Shared body of the rm_helpful and rm_safety stages (they differ only in their preference table)."""

from __future__ import annotations

from dataclasses import asdict

from components.data.datasets import fit_context, held_out_items, messages_column, read_table, too_long_policy
from components.rlhf.reward import PreferencePair, encode_pair
from components.train.rm import RMTrainConfig, train_rm
from components.track.tracking import stage_run
from flows._stage import finish_stage, load_params, path, stage_config
from model.checkpoint import load_args
from model.tokenizer import Tokenizer


def run(stage: str, table: str) -> None:
    params = load_params()
    cfg = stage_config(params, "rm", RMTrainConfig)
    cut = _cut_pair if too_long_policy(params["data"]) == "truncate" else None
    sft, out = path("checkpoints/sft"), path(f"checkpoints/{stage}")
    with stage_run(stage, asdict(cfg), params["profile"], [sft, path("data/raw")], out) as run_:
        tokenizer = Tokenizer.load(sft / "tokenizer.model")
        rows = read_table(path(f"data/raw/{table}.parquet"))
        prompts = messages_column(rows, "prompt")
        items = rows.column("item").to_pylist()
        pairs = [(encode_pair(tokenizer, p, c, r, rating), item) for p, c, r, rating, item in zip(
            prompts, rows.column("chosen").to_pylist(), rows.column("rejected").to_pylist(),
            rows.column("rating").to_pylist(), items)]
        pairs, counts = fit_context(pairs, [max(len(p.chosen), len(p.rejected)) for p, _ in pairs],
                                    load_args(sft).max_seq_len, "preference pairs", stage, cut)
        val_items = held_out_items([item for _, item in pairs], cfg.val_fraction)
        val = [p for p, item in pairs if item in val_items]
        train = [p for p, item in pairs if item not in val_items]
        split = {"train_pairs": len(train), "val_pairs": len(val), "val_items": len(val_items),
                 "train_items": len({item for _, item in pairs}) - len(val_items)}
        print(f"[{stage}] {len(train)} training pairs, {len(val)} held out ({len(val_items)} held-out items)")
        metrics = train_rm(sft, train, val, cfg, stage, out, run_.info.run_id)
        finish_stage(stage, {**metrics, **counts, **split}, out)


def _cut_pair(entry: tuple[PreferencePair, str], limit: int) -> tuple[PreferencePair, str] | None:
    """Both sides cut to the context (as TRL's max_length); a pair whose sides then agree says nothing: dropped."""
    pair, item = entry
    chosen, rejected = pair.chosen[:limit], pair.rejected[:limit]
    return None if chosen == rejected else (PreferencePair(chosen, rejected, pair.rating), item)
