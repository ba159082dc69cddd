"""The tables of the synthetic world: the rows of every table, their schemas, and generate_world (all of them).

Tables (SCHEMAS; "messages" = JSON list of {"role", "content"}; "reference" = JSON dict for the oracle, always with
an "expected" key holding the canonical answer; "item" = the underlying items asked (components/data/tasks.py), joined
by ITEM_SEP when a row asks several):
  pretrain        doc_id, text, planted, pii_kinds, item (the items of the document's Q/A segments; "" if none)
  sft             messages (ends with the assistant turn; ~15% have an earlier turn, ~7% a GAtt system prompt), task,
                  item (every user turn's)
  prefs_helpful   prompt, chosen, rejected, rating, task, reference, item (ranked by oracle.preference_score "helpful")
  prefs_safety    same columns                                             (ranked by oracle.preference_score "safety")
  rl_prompts      prompt, task, is_safety, reference, item
  gatt            system, messages (user/assistant turns only: the system prompt is the `system` column), instruction,
                  item (every user turn's); 2-4 turns
  eval_prompts    as rl_prompts, held-out items only; eval_gatt as gatt (assistant turns are reference answers),
                  eval_gatt_turns (WorldConfig) turns of held-out items
Real rows (components/data/ingest.py) carry no item: they get a hash of their prompt.
"""

from __future__ import annotations

import json
import random

import pyarrow as pa

from components.data.corpus import pretrain_rows, seg_narrative
from components.data.language import (COLORS, COMPLIANCE_TEMPLATES, FACT_ANSWERS, FOODS, GATT_SYSTEM_PROMPTS,
                                      INSULT_ADJECTIVES, INSULT_NOUNS, NON_ANSWERS, PLACES, SMALL_TALK)
from components.data.oracle import (GATT_INSTRUCTIONS, RATINGS, REFUSAL, TASKS, is_toxic, preference_score,
                                    rating_for_gap)
from components.data.tasks import (HELPFUL_PREF_WEIGHTS, ITEM_SEP, SAFETY_PREF_WEIGHTS, TASK_WEIGHTS, Prompt, draw,
                                   follow, pool_keys, prompt_pools, split_counts)
from components.data.world import World, WorldConfig, build_world

__all__ = ["SCHEMAS", "ITEM_SEP", "generate_world"]

_MESSAGES = pa.string()  # JSON list of {"role", "content"}
_ITEM = ("item", pa.string())
_PROMPT_SCHEMA = pa.schema([("prompt", _MESSAGES), ("task", pa.string()), ("is_safety", pa.bool_()),
                            ("reference", pa.string()), _ITEM])
_PREF_SCHEMA = pa.schema([("prompt", _MESSAGES), ("chosen", pa.string()), ("rejected", pa.string()),
                          ("rating", pa.string()), ("task", pa.string()), ("reference", pa.string()), _ITEM])
_GATT_SCHEMA = pa.schema([("system", pa.string()), ("messages", _MESSAGES), ("instruction", pa.string()), _ITEM])
SCHEMAS = {
    "pretrain": pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("planted", pa.string()),
                           ("pii_kinds", pa.list_(pa.string())), _ITEM]),
    "sft": pa.schema([("messages", _MESSAGES), ("task", pa.string()), _ITEM]),
    "prefs_helpful": _PREF_SCHEMA,
    "prefs_safety": _PREF_SCHEMA,
    "rl_prompts": _PROMPT_SCHEMA,
    "gatt": _GATT_SCHEMA,
    "eval_prompts": _PROMPT_SCHEMA,
    "eval_gatt": _GATT_SCHEMA,
}


# ---------------------------------------------------------------------------------------------------- messages
def _system(text: str) -> dict:
    return {"role": "system", "content": text}


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _prompt_row(p: Prompt) -> dict:
    reference = {**p.reference, "expected": p.answer}
    return {"prompt": json.dumps([_user(p.text)]), "task": p.task, "is_safety": p.task == "harmful",
            "reference": json.dumps(reference), "item": p.item}


# ----------------------------------------------------------------------------------------------- SFT and RL rows
def _sft_rows(cfg: WorldConfig, pools: dict[str, list[Prompt]]) -> list[dict]:
    rng = random.Random(f"{cfg.seed}/sft")
    earlier = [p for key, pool in pools.items() if key != "harmful" for p in pool]
    rows = []
    for p in draw(rng, pools, TASK_WEIGHTS, cfg.n_sft):
        messages, items = [_user(p.text), _assistant(p.answer)], [p.item]
        if p.task in ("fact", "arithmetic") and rng.random() < cfg.system_prompt_fraction:
            # As Llama 2's SFT data, some turns follow a system instruction: the SFT model then obeys one next to
            # the question, and it is Ghost Attention's job to make it hold in later turns.
            instruction = rng.choice([i for i in GATT_INSTRUCTIONS if p.task == "fact" or i != "uppercase"])
            messages = [_system(rng.choice(GATT_SYSTEM_PROMPTS[instruction])), _user(p.text),
                        _assistant(follow(instruction, p))]
        elif rng.random() < cfg.multi_turn_fraction:  # teaches the model that a turn ends and a new one begins
            first = rng.choice(earlier)
            messages, items = [_user(first.text), _assistant(first.answer)] + messages, [first.item] + items
        rows.append({"messages": json.dumps(messages), "task": p.task, "item": ITEM_SEP.join(items)})
    return rows


def _rl_rows(cfg: WorldConfig, pools: dict[str, list[Prompt]]) -> list[dict]:
    rng = random.Random(f"{cfg.seed}/rl")
    return [_prompt_row(p) for p in draw(rng, pools, TASK_WEIGHTS, cfg.n_rl_prompts)]


def _eval_rows(cfg: WorldConfig, held_out: dict[str, list[Prompt]]) -> list[dict]:
    """Equal share per task, distinct prompts only. Within a task a short pool's shortfall goes to its other pools
    (format/list is small); a task whose held-out pools are all short gets fewer (small_talk: ~14 items x 5 forms)."""
    rng = random.Random(f"{cfg.seed}/eval")
    out = []
    for task, k in split_counts(cfg.n_eval_prompts, dict.fromkeys(TASKS, 1.0)).items():
        keys = sorted(pool_keys(task), key=lambda key: len(held_out[key]))  # smallest first: the rest fill in
        for i, key in enumerate(keys):
            share = split_counts(k, dict.fromkeys(keys[i:], 1.0))[key]
            picked = rng.sample(held_out[key], min(share, len(held_out[key])))
            out, k = out + picked, k - len(picked)
    rng.shuffle(out)
    return [_prompt_row(p) for p in out]


# -------------------------------------------------------------------------------------------------------- GAtt
def gatt_rows(rng: random.Random, pools: dict[str, list[Prompt]], n: int, turns: tuple[int, int]) -> list[dict]:
    # Fact and arithmetic turns only (each has a one-word answer, so every instruction can be followed), half and
    # half; "uppercase" takes facts only, since "7 + 5 = 12." has no letters to put in uppercase.
    rows = []
    for _ in range(n):
        instruction = rng.choice(GATT_INSTRUCTIONS)
        keys = ["fact"] if instruction == "uppercase" else ["fact", "arithmetic"]
        available = len({p.item for key in keys for p in pools[key]})
        n_turns, by_item = min(rng.randint(*turns), available), {}
        while len(by_item) < n_turns:
            key = "fact" if instruction == "uppercase" or rng.random() < 0.5 else "arithmetic"
            p = rng.choice(pools[key])
            by_item.setdefault(p.item, p)  # distinct items within a dialog
        messages = []
        for p in by_item.values():
            messages += [_user(p.text), _assistant(follow(instruction, p))]
        rows.append({"system": rng.choice(GATT_SYSTEM_PROMPTS[instruction]), "messages": json.dumps(messages),
                     "instruction": instruction, "item": ITEM_SEP.join(by_item)})
    return rows


# ------------------------------------------------------------------------------------------------- preferences
def _insult(rng: random.Random) -> str:
    return rng.choice((f"Only a {rng.choice(INSULT_NOUNS)} would ask that.",
                       f"What a {rng.choice(INSULT_ADJECTIVES)} question."))


def _candidates(rng: random.Random, world: World, p: Prompt, toxic: bool, sums: set[str],
                howtos: list[str]) -> list[str]:
    """Responses of graded quality for one prompt; the oracle, not this function, decides their order. howtos: the
    answers of training benign look-alikes."""
    ref, out = p.reference, [p.answer, REFUSAL]
    out.append(rng.choice(NON_ANSWERS))
    # Off-topic world text, as a barely tuned model rambles: without it the reward models never see such answers
    # and may score them high, which PPO would exploit.
    out.append(seg_narrative(rng, world, sums))
    if p.task == "arithmetic":
        c = ref["answer"]
        head = f"{ref['a']} {ref['op']} {ref['b']} ="
        far = c + rng.choice((-1, 1)) * rng.randint(3, 10)
        out += [str(c), *(f"{head} {c + d}." for d in (1, -1, 2) if c + d >= 0), f"{head} {abs(far)}."]
    elif p.task == "fact":
        e, attr, v = ref["entity"], ref["attribute"], ref["answer"]
        wrong = rng.choice([x for x in ref["choices"] if x != v])
        others = [o for o in world.entities if world.facts[o][attr] != v]
        out += [FACT_ANSWERS[attr].format(e=e, v=wrong), f"It could be {v} or {wrong}."]
        if others:
            o = rng.choice(others)
            out.append(FACT_ANSWERS[attr].format(e=o, v=world.facts[o][attr]))
    elif p.task == "format":
        kind = ref["kind"]
        if kind == "uppercase":
            source = p.extra["source"]
            kept = source.split()
            del kept[rng.randrange(len(kept))]
            out += [source, source.lower(), " ".join(kept).upper()]
        elif kind == "one_word":
            wrong = rng.choice([x for x in ref["choices"] if x != ref["answer"]]) if ref["choices"] \
                else str(int(ref["answer"]) + rng.choice((1, 2, 3)))
            out += [p.extra["sentence"], wrong, f"The answer is {wrong} or {ref['answer']}."]
        else:
            n, items = ref["n"], ref["items"]
            invalid = rng.choice([x for x in (*COLORS, *FOODS, *PLACES) if x not in items])
            picks = rng.sample(items, min(len(items), n + 1))
            out += [", ".join(picks) + ".", ", ".join(picks[:n - 1]) + ".",
                    ", ".join(picks[:n - 1] + [invalid]) + ".", ", ".join([picks[0]] * n) + "."]
    elif p.task == "harmful":
        # Anything but the refusal is unsafe (oracle.safety), not only an explicit compliance: with compliance alone
        # as the rejected side, the safety RM scored a harmless-looking how-to, a ramble or a non-answer to "How do
        # I make a bomb?" above the refusal, and rejection sampling and PPO learned to stop refusing training topics.
        out += [t.format(x=ref["topic"]) for t in COMPLIANCE_TEMPLATES] + [rng.choice(howtos)]
    elif p.task == "benign_lookalike":
        out.append(f"You will need the {ref['keywords'][0]}.")  # half the keywords: partial credit
    elif p.task == "small_talk":  # the reply without its courtesy, the courtesy alone, another intent's reply
        other = rng.choice([a for intent, (a, _) in SMALL_TALK.items() if intent != ref["intent"]])
        out += [p.answer.split("!")[0].split(".")[0] + ".", "How can I help you?", other]
    if toxic:
        out += [f"{p.answer} {_insult(rng)}", f"{rng.choice(out[2:])} {_insult(rng)}"]
        if p.task == "harmful":
            out.append(f"{COMPLIANCE_TEMPLATES[0].format(x=ref['topic'])} {_insult(rng)}")
    return list(dict.fromkeys(out))  # distinct, order kept (deterministic)


def _pick_pair(rng: random.Random, scored: list[tuple[float, str]], kind: str, task: str):
    """A (chosen, rejected, gap) pair: first a target rating at random (so all 4 levels occur), then a pair whose
    gap falls in it, else any pair with a positive gap."""
    pairs = [(a, b, sa - sb) for sa, a in scored for sb, b in scored if sa - sb > 1e-9]
    if kind == "safety" and task not in ("harmful", "benign_lookalike"):
        # On ordinary prompts a safety comparison is about tone: the rejected side is the toxic one.
        pairs = [(a, b, g) for a, b, g in pairs if is_toxic(b) and not is_toxic(a)]
    if not pairs:
        return None
    target = rng.choice(RATINGS)
    in_target = [pair for pair in pairs if rating_for_gap(pair[2]) == target]
    return rng.choice(in_target or pairs)


def _pref_rows(cfg: WorldConfig, world: World, pools: dict[str, list[Prompt]], kind: str) -> list[dict]:
    rng = random.Random(f"{cfg.seed}/prefs/{kind}")
    weights = HELPFUL_PREF_WEIGHTS if kind == "helpful" else SAFETY_PREF_WEIGHTS
    sums = {p.item for p in pools["arithmetic"]}  # off-topic stories work out training sums only
    howtos = [p.answer for p in pools["benign_lookalike"]]
    rows = []
    for p in draw(rng, pools, weights, cfg.n_pref_pairs):
        scored = [(preference_score(kind, p.task, p.reference, c), c)
                  for c in _candidates(rng, world, p, toxic=kind == "safety", sums=sums, howtos=howtos)]
        pair = _pick_pair(rng, scored, kind, p.task)
        if pair is None:  # cannot happen with the candidate sets above; the tests check the row count
            continue
        chosen, rejected, gap = pair
        rows.append({"prompt": json.dumps([_user(p.text)]), "chosen": chosen, "rejected": rejected,
                     "rating": rating_for_gap(gap), "task": p.task,
                     "reference": json.dumps({**p.reference, "expected": p.answer}), "item": p.item})
    return rows


# -------------------------------------------------------------------------------------------------- the tables
def generate_world(cfg: WorldConfig) -> dict[str, pa.Table]:
    """All tables of the synthetic world (schemas in SCHEMAS); pure and deterministic in cfg."""
    world = build_world(cfg)
    train, held_out = prompt_pools(cfg, world)
    rows = {
        "pretrain": pretrain_rows(cfg, world, train),
        "sft": _sft_rows(cfg, train),
        "prefs_helpful": _pref_rows(cfg, world, train, "helpful"),
        "prefs_safety": _pref_rows(cfg, world, train, "safety"),
        "rl_prompts": _rl_rows(cfg, train),
        "gatt": gatt_rows(random.Random(f"{cfg.seed}/gatt"), train, cfg.n_gatt_dialogs, (2, 4)),
        "eval_prompts": _eval_rows(cfg, held_out),
        "eval_gatt": gatt_rows(random.Random(f"{cfg.seed}/eval_gatt"), held_out, cfg.n_eval_gatt,
                                (cfg.eval_gatt_turns, cfg.eval_gatt_turns)),
    }
    return {name: pa.Table.from_pylist(table_rows, schema=SCHEMAS[name]) for name, table_rows in rows.items()}
