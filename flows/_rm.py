"""Shared body of the rm_helpful@<round> and rm_safety@<round> stages (they differ only in their preference table):
initialised from the round's policy (the latest chat model, as the paper), trained on the world's table plus the
round's pooled pairs on the policies' own answers (data/rounds/<round>/, flows/prefs.py)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import torch

from components.data.datasets import fit_context, held_out_items, messages_column, read_table, too_long_policy
from components.common import write_json
from components.data.oracle import TASKS, safety
from components.rlhf.annotate import SCHEMA
from components.rlhf.reward import (PAPER_THRESHOLD, THRESHOLD_FILE, PreferencePair, choose_threshold, encode_pair,
                                    evaluate_rm, pad_right, precision_recall, score)
from components.train.rm import RMTrainConfig, train_rm
from components.track.tracking import stage_run
from flows._stage import finish_stage, load_params, path, rlhf_round, round_arg, stage_config
from model.checkpoint import load_args, load_checkpoint
from model.tokenizer import Tokenizer


def run(kind: str, table: str) -> None:
    name = round_arg()
    stage = f"{kind}@{name}"
    params = load_params()
    policy, _ = rlhf_round(params, name)
    cfg = stage_config(params, "rm", RMTrainConfig)
    cut = _cut_pair if too_long_policy(params["data"]) == "truncate" else None
    ours, out = path(f"data/rounds/{name}/{table}.parquet"), path(f"checkpoints/{name}/{kind}")
    with stage_run(stage, asdict(cfg), params["profile"], [policy, path("data/raw")], out) as run_:
        tokenizer = Tokenizer.load(policy / "tokenizer.model")
        world = read_table(path(f"data/raw/{table}.parquet"))
        rows = pa.concat_tables([world.append_column("round", pa.array(["world"] * world.num_rows, pa.string()))
                                 .select(SCHEMA.names).cast(SCHEMA), read_table(ours).select(SCHEMA.names)])
        prompts = messages_column(rows, "prompt")
        pairs = [encode_pair(tokenizer, p, c, r, rating) for p, c, r, rating in zip(
            prompts, rows.column("chosen").to_pylist(), rows.column("rejected").to_pylist(),
            rows.column("rating").to_pylist())]
        # Each pair with its item, the oracle's unsafe flags of its two answers (the oracle as annotator), for the
        # threshold, and where it comes from (world, or the round whose policy wrote it).
        labels = _unsafe_labels(rows) if kind == "rm_safety" else [None] * len(pairs)
        entries = list(zip(pairs, rows.column("item").to_pylist(), labels, rows.column("round").to_pylist()))
        entries, counts = fit_context(entries, [max(len(p.chosen), len(p.rejected)) for p in pairs],
                                      load_args(policy).max_seq_len, "preference pairs", stage, cut)
        val_items = held_out_items([e[1] for e in entries], cfg.val_fraction)
        val = [e for e in entries if e[1] in val_items]
        train = [e[0] for e in entries if e[1] not in val_items]
        split = {"train_pairs": len(train), "val_pairs": len(val), "val_items": len(val_items),
                 "train_items": len({e[1] for e in entries}) - len(val_items),
                 "round_pairs": sum(e[3] == name for e in entries),
                 "earlier_round_pairs": sum(e[3] not in ("world", name) for e in entries)}
        print(f"[{stage}] {len(train)} training pairs, {len(val)} held out ({len(val_items)} held-out items)")
        metrics = train_rm(policy, train, [e[0] for e in val], cfg, stage, out, run_.info.run_id)
        metrics.update(_accuracy_by_source(out, val, name))
        if kind == "rm_safety":
            metrics.update(_safety_threshold(out, [e[0] for e in val], [e[2] for e in val],
                                             cfg.threshold_precision))
        finish_stage(stage, {**metrics, **counts, **split}, out)


def _accuracy_by_source(checkpoint, val: list[tuple], name: str) -> dict:
    """Held-out accuracy (overall and per rating level) on the world's pairs and on this round's policy pairs
    apart: the world's templated answers are easy; the policy's own text is what rejection sampling and PPO score."""
    model, _ = load_checkpoint(checkpoint)
    out = {}
    for source, prefix in (("world", "world_"), (name, "round_")):
        pairs = [e[0] for e in val if e[3] == source]
        out[f"{prefix}val_pairs"] = len(pairs)
        if pairs:
            with torch.no_grad():
                out.update({f"{prefix}val_{k}": v for k, v in evaluate_rm(model, pairs, 0, 64).items()})
    return out


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


def _cut_pair(entry: tuple[PreferencePair, str, tuple | None, str], limit: int):
    """Both sides cut to the context (as TRL's max_length); a pair whose sides then agree says nothing: dropped."""
    pair, *rest = entry
    chosen, rejected = pair.chosen[:limit], pair.rejected[:limit]
    return None if chosen == rejected else (PreferencePair(chosen, rejected, pair.rating), *rest)
