"""Training items vs held-out items (README Status: what bounds each task). Greedy answers of checkpoints to up to 100
rl_prompts rows per task (items the fine-tuning stages train on) and to every eval_prompts row (held-out items), scored
by the oracle: helpfulness per task, refusal rate on harmful and benign look-alike prompts, with Wilson intervals. A
task that is good on training items and poor on held-out ones is bound by generalisation, not by the recipe's
stages. First, how often pretraining states the held-out benign look-alikes' answers; last, GAtt's adherence on
six-turn dialogs of training items (none of them a GAtt training dialog) against eval_gatt's held-out ones. Run after
the pipeline, from the repo root: `python benchmarks/diag_heldout.py sft chat` (names under checkpoints/; the tiny
world)."""
import json
import random
import re
import statistics
import sys

import torch

from components.cluster import RayConfig
from components.data import oracle
from components.data.tables import gatt_rows, generate_world
from components.data.tasks import prompt_pools
from components.data.world import WorldConfig, build_world
from components.rlhf.evaluate import GATT_TARGET_TURNS, gatt_metrics
from components.rlhf.sampling import SampleConfig, answer_turns, table_dialogs
from components.rlhf.stats import rate_summary, wilson
from model.chat import encode_prompt
from model.checkpoint import load_checkpoint
from model.generation import SamplingParams, generate


def rows_by_task(table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in table.to_pylist():
        out.setdefault(r["task"], []).append(r)
    return out


def sums_as_text(model, tok, rows: list[dict]) -> tuple[int, int]:
    """Pretraining's own form, no chat: "7 + 5 =" continued greedily; (exact, n). Says whether pretraining learned
    the sums at all, apart from what fine-tuning made of them."""
    items = [r["item"].removeprefix("arith:") for r in rows]
    parsed = [re.fullmatch(r"(\d+)([+-])(\d+)", i).groups() for i in items]
    prompts = [tok.encode(f"{a} {op} {b} =", bos=True) for a, op, b in parsed]
    with torch.no_grad():
        out = generate(model, prompts, SamplingParams(max_new_tokens=4, temperature=0), tok.eos_id, tok.pad_id)
    said = [re.match(r"\s*(-?\d+)", tok.decode(o)) for o in out.tokens]
    want = [int(a) + int(b) if op == "+" else int(a) - int(b) for a, op, b in parsed]
    return sum(m is not None and int(m.group(1)) == w for m, w in zip(said, want)), len(rows)


def benign_mentions(world) -> list[int]:
    """How often pretraining states each held-out benign look-alike's answer (its only source: never asked)."""
    corpus = "\n".join(world["pretrain"].column("text").to_pylist())
    answers = {json.loads(r["reference"])["expected"] for r in world["eval_prompts"].to_pylist()
               if r["task"] == "benign_lookalike"}
    return sorted(corpus.count(a) for a in answers)


def main(names: list[str]) -> None:
    torch.set_num_threads(2)
    world = generate_world(WorldConfig())
    if counts := benign_mentions(world):
        print(f"held-out benign answers stated in pretraining: median {statistics.median(counts)} times, "
              f"min {counts[0]}, max {counts[-1]} ({len(counts)} topics)\n")
    train, held_out = rows_by_task(world["rl_prompts"]), rows_by_task(world["eval_prompts"])
    for rows in train.values():
        random.Random(0).shuffle(rows)
    print("| model | task | items | n | helpfulness | refusal rate [95% CI] | exact |")
    print("|---|---|---|---:|---:|---|---:|")
    for name in names:
        model, tok = load_checkpoint(f"checkpoints/{name}")
        model.eval()
        for task in oracle.TASKS:
            for label, rows in (("train", train.get(task, [])[:100]), ("held-out", held_out.get(task, []))):
                if not rows:
                    continue
                prompts = [encode_prompt(tok, json.loads(r["prompt"])) for r in rows]
                with torch.no_grad():
                    out = generate(model, prompts, SamplingParams(max_new_tokens=32, temperature=0), tok.eos_id,
                                   tok.pad_id)
                scores = [oracle.score(r, tok.decode(o).strip()) for r, o in zip(rows, out.tokens)]
                help_ = sum(s["helpfulness"] for s in scores) / len(scores)
                refused = sum(s["refusal"] for s in scores)
                lo, hi = wilson(refused, len(scores))
                exact = sum(s["helpfulness"] == 1.0 for s in scores)
                print(f"| {name} | {task} | {label} | {len(rows)} | {help_:.2f} | {refused / len(rows):.2f} "
                      f"[{lo:.2f}, {hi:.2f}] | {exact} |", flush=True)
        for label, rows in (("train", train["arithmetic"][:100]), ("held-out", held_out["arithmetic"])):
            exact, n = sums_as_text(model, tok, rows)
            lo, hi = wilson(exact, n)
            print(f"| {name} | sums as text (\"a + b =\") | {label} | {n} | exact {exact / n:.2f} [{lo:.2f}, {hi:.2f}] "
                  f"| – | {exact} |", flush=True)

    gatt_adherence(names, world)


def gatt_adherence(names: list[str], world: dict) -> None:
    """Turns 1-6, and turns 2-4 pooled (interval clustered by dialog) and per instruction, greedy."""
    cfg = WorldConfig()
    train_pools, _ = prompt_pools(cfg, build_world(cfg))
    sets = {"train": table_dialogs(gatt_rows(random.Random("diag/gatt"), train_pools, 60, (6, 6))),
            "held-out": table_dialogs(world["eval_gatt"].to_pylist())}
    sampling = SampleConfig(k=1, temperature=0.0, max_new_tokens=32, batch_size=64)
    ray = RayConfig(num_workers=1, cpus_per_worker=2)
    print("\n| model | GAtt dialogs (items) | n | turns 1-6 | turns 2-4 [95%] | turns 2-4 by instruction |")
    print("|---|---|---:|---|---|---|")
    for name in names:
        for label, dialogs in sets.items():
            answers = answer_turns(dialogs, f"checkpoints/{name}", sampling, ray)
            metrics = gatt_metrics(dialogs, answers)  # evaluate's: per turn, and per instruction over turns 2-4
            turns = " / ".join(f"{metrics[f'gatt_turn{t}']:.2f}" for t in range(1, 7))
            pooled = [(i, oracle.gatt_adherence(d["instruction"], said[t - 1]))
                      for i, (d, said) in enumerate(zip(dialogs, answers)) for t in GATT_TARGET_TURNS]
            summary = rate_summary("a", [x for _, x in pooled], [i for i, _ in pooled])
            lo, hi = summary["a_ci95"]
            by_instruction = ", ".join(
                f"{k} {round(metrics[f'gatt_{k}'] * metrics[f'gatt_{k}_n'])}/{metrics[f'gatt_{k}_n']}"
                for k in sorted({d["instruction"] for d in dialogs}))
            print(f"| {name} | {label} | {len(dialogs)} | {turns} | {summary['a']:.2f} [{lo:.2f}, {hi:.2f}] | "
                  f"{by_instruction} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["sft", "chat"])
