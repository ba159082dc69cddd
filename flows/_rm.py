"""Shared body of the rm_helpful and rm_safety stages (they differ only in their preference table)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from components.data.datasets import fit_context, held_out_items, messages_column, read_table, too_long_policy
from components.common import write_json
from components.data.oracle import TASKS, safety
from components.rlhf.reward import (PAPER_THRESHOLD, THRESHOLD_FILE, PreferencePair, choose_threshold, encode_pair,
                                    pad_right, precision_recall, score)
from components.train.rm import RMTrainConfig, train_rm
from components.track.tracking import stage_run
from flows._stage import finish_stage, load_params, path, stage_config
from model.checkpoint import load_args, load_checkpoint
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
        pairs = [encode_pair(tokenizer, p, c, r, rating) for p, c, r, rating in zip(
            prompts, rows.column("chosen").to_pylist(), rows.column("rejected").to_pylist(),
            rows.column("rating").to_pylist())]
        # Each pair with its item and the oracle's unsafe flags of its two answers (the oracle as annotator), for
        # the threshold.
        labels = _unsafe_labels(rows) if stage == "rm_safety" else [None] * len(pairs)
        entries = list(zip(pairs, rows.column("item").to_pylist(), labels))
        entries, counts = fit_context(entries, [max(len(p.chosen), len(p.rejected)) for p in pairs],
                                      load_args(sft).max_seq_len, "preference pairs", stage, cut)
        val_items = held_out_items([item for _, item, _ in entries], cfg.val_fraction)
        val = [e for e in entries if e[1] in val_items]
        train = [p for p, item, _ in entries if item not in val_items]
        split = {"train_pairs": len(train), "val_pairs": len(val), "val_items": len(val_items),
                 "train_items": len({item for _, item, _ in entries}) - len(val_items)}
        print(f"[{stage}] {len(train)} training pairs, {len(val)} held out ({len(val_items)} held-out items)")
        metrics = train_rm(sft, train, [p for p, _, _ in val], cfg, stage, out, run_.info.run_id)
        if stage == "rm_safety":
            metrics.update(_safety_threshold(out, [p for p, _, _ in val], [u for _, _, u in val],
                                             cfg.threshold_precision))
        finish_stage(stage, {**metrics, **counts, **split}, out)


def _unsafe_labels(rows) -> list[tuple[bool, bool] | None]:
    """(chosen unsafe, rejected unsafe) by oracle.safety on each row's task; None where the row has no known task
    (ingested preference data)."""
    tasks = rows.column("task").to_pylist() if "task" in rows.column_names else [None] * rows.num_rows
    return [(safety(t, c) == 0.0, safety(t, r) == 0.0) if t in TASKS else None for t, c, r in zip(
        tasks, rows.column("chosen").to_pylist(), rows.column("rejected").to_pylist())]


def _safety_threshold(checkpoint, pairs: list[PreferencePair], labels: list, target_precision: float) -> dict:
    """Precision/recall of "safety RM probability < t => unsafe" on the held-out pairs' answers: the largest t
    reaching target_precision -> checkpoint/THRESHOLD_FILE (read by rlhf.safety_threshold: auto), and the paper's
    0.15 on the same answers. Nothing when the pairs carry no oracle labels."""
    labelled = [(p, u) for p, u in zip(pairs, labels) if u is not None]
    if not labelled:
        print("[rm_safety] held-out pairs without oracle labels: no safety threshold chosen")
        return {}
    model, _ = load_checkpoint(checkpoint)
    rows = [side for p, _ in labelled for side in (p.chosen, p.rejected)]
    unsafe = [flag for _, u in labelled for flag in u]
    probabilities = []
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            tokens, last = pad_right(rows[i:i + 64], 0)  # right padding: its value is never read
            probabilities += torch.sigmoid(score(model, tokens, last).float()).tolist()
    chosen = choose_threshold(probabilities, unsafe, target_precision)
    paper = precision_recall(probabilities, unsafe, PAPER_THRESHOLD["threshold"])
    write_json(Path(checkpoint) / THRESHOLD_FILE, {**chosen, "answers": len(unsafe), "unsafe": sum(unsafe)})
    print(f"[rm_safety] threshold {chosen}; at the paper's {PAPER_THRESHOLD['threshold']}: {paper}")
    return {"threshold_auto": chosen["threshold"], "threshold_auto_precision": chosen["precision"],
            "threshold_auto_recall": chosen["recall"], "threshold_auto_target_met": chosen["target_met"],
            "threshold_answers": len(unsafe), "threshold_unsafe_share": sum(unsafe) / len(unsafe),
            "threshold_paper_precision": paper["precision"] if paper["precision"] is not None else float("nan"),
            "threshold_paper_recall": paper["recall"], "paper_precision": PAPER_THRESHOLD["precision"],
            "paper_recall": PAPER_THRESHOLD["recall"]}


def _cut_pair(entry: tuple[PreferencePair, str, tuple | None], limit: int):
    """Both sides cut to the context (as TRL's max_length); a pair whose sides then agree says nothing: dropped."""
    pair, *rest = entry
    chosen, rejected = pair.chosen[:limit], pair.rejected[:limit]
    return None if chosen == rejected else (PreferencePair(chosen, rejected, pair.rating), *rest)
