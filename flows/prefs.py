"""DVC stage `prefs@<round>` (iterative RLHF, §3.2.1): answers to training prompts from the round's policy (two
temperatures, Ray Data), every two of a prompt's labelled by the oracle with the paper's four rating levels ->
data/rounds/<round>/prefs_helpful.parquet and prefs_safety.parquet, pooled with the previous round's pairs; counts per
level -> metrics/<round>/prefs.json."""

from __future__ import annotations

import json
from dataclasses import asdict

import pyarrow.parquet as pq

from components.data.datasets import fit_context, read_table
from components.rlhf.annotate import (KINDS, PrefsConfig, annotate, comparisons, counts, draw_prompts, kind_of,
                                      pooled)
from components.rlhf.sampling import sample
from components.track.tracking import stage_run
from flows._stage import load_params, path, rlhf_round, round_arg, run_stage, stage_config, write_metrics
from model.chat import encode_prompt
from model.checkpoint import load_args
from model.tokenizer import Tokenizer


def round_dir(name: str):
    return path(f"data/rounds/{name}")


def main() -> None:
    name = round_arg()
    params = load_params()
    policy, earlier = rlhf_round(params, name)
    cfg = stage_config(params, "prefs", PrefsConfig)
    previous = round_dir(earlier[-1]) if earlier else None  # its tables pool every round before it
    with stage_run(f"prefs@{name}", asdict(cfg), params["profile"], [policy, path("data/raw")], None):
        import mlflow

        rows = draw_prompts(read_table(path("data/raw/rl_prompts.parquet")).to_pylist(), cfg.prompts, name, cfg.seed)
        records = [{**r, "messages": json.loads(r["prompt"])} for r in rows]
        tokenizer = Tokenizer.load(policy / "tokenizer.model")
        records, dropped = fit_context(records, [len(encode_prompt(tokenizer, r["messages"])) for r in records],
                                       load_args(policy).max_seq_len - cfg.max_new_tokens, "prompts", f"prefs@{name}")
        answers = [[] for _ in records]  # each prompt's answers, temperature by temperature
        for t in cfg.temperatures:
            for mine, r in zip(answers, sample([{"prompt": r["messages"]} for r in records], policy,
                                               cfg.sampling(t), cfg.ray), strict=True):
                mine.extend(r["answers"])
        new = annotate(records, answers, name)
        asked = {kind: sum(len(comparisons(a)) for r, a in zip(records, answers) if kind in kind_of(r["task"]))
                 for kind in KINDS}
        out = round_dir(name)
        out.mkdir(parents=True, exist_ok=True)
        tables = {}
        for kind in KINDS:
            before = pq.read_table(previous / f"prefs_{kind}.parquet") if previous else None
            tables[kind] = pooled(before, new[kind])
            pq.write_table(tables[kind], out / f".prefs_{kind}.parquet.tmp")  # whole or not at all
            (out / f".prefs_{kind}.parquet.tmp").replace(out / f"prefs_{kind}.parquet")
        stats = {**counts({k: tables[k].to_pylist() for k in KINDS}, asked, name), "prompts": len(records),
                 **dropped}
        mlflow.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        write_metrics(f"{name}/prefs", stats)
        print(f"[prefs@{name}] {stats}")


if __name__ == "__main__":
    run_stage(main)
