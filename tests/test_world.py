"""The synthetic world: determinism, schemas, planted noise, evaluation held out by item, and agreement with the
oracle."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import Counter

import pytest

from components.data import oracle
from components.data.corpus import NOISE_KINDS, PII_KINDS, PLANTED_KINDS
from components.data.language import (BENIGN_TOPICS, COMPLIANCE_TEMPLATES, DESCRIPTION_SENTENCES, EVAL_ONLY_TEMPLATES,
                                      GATT_SYSTEM_PROMPTS, HARMFUL_TOPICS, ONE_WORD_PREFIX)
from components.data.oracle import REFUSAL, TASKS, TOXIC_LEXICON
from components.data.tables import ITEM_SEP, SCHEMAS, generate_world
from components.data.tasks import PINNED_TRAIN_ITEMS, chat_item, pool_keys, prompt_pools, split_counts
from components.data.world import WorldConfig, build_world

SMALL = WorldConfig(seed=3, n_entities=12, n_pretrain_docs=600, noise_rate=0.3, n_sft=300, n_pref_pairs=300,
                    n_rl_prompts=200, n_gatt_dialogs=80, n_eval_prompts=100, n_eval_gatt=20)

# Independent detectors of the planted PII (not the generator's code): each planted kind must be findable.
PII_PATTERNS = {
    "email": re.compile(r"\b[\w.]+@[\w-]+(\.[\w-]+)+\b"),
    "phone": re.compile(r"(\(\d{3}\) \d{3}-\d{4}|\b\d{3}-\d{3}-\d{4}\b|\+1 \d{3} \d{3} \d{4})"),
    "card": re.compile(r"\b\d{4}([ -])\d{4}\1\d{4}\1\d{4}\b"),
    "id_number": re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),
    "ip": re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b"),
}


def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(reversed(digits)))
    return total % 10 == 0


@pytest.fixture(scope="module")
def tables():
    return generate_world(SMALL)


@pytest.fixture(scope="module")
def rows(tables):
    return {name: table.to_pylist() for name, table in tables.items()}


@pytest.fixture(scope="module")
def tiny():
    """The tiny profile's world (WorldConfig defaults), its tables as rows, and how long it took to generate."""
    start = time.perf_counter()
    tables = generate_world(WorldConfig())
    return tables, {name: t.to_pylist() for name, t in tables.items()}, time.perf_counter() - start


def user_texts(messages_json: str) -> list[str]:
    return [m["content"] for m in json.loads(messages_json) if m["role"] == "user"]


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


# --------------------------------------------------------------------------------------------- sizes and speed
def eval_sizes(cfg: WorldConfig) -> dict[str, int]:
    """eval_prompts per task: an equal share, or the whole held-out pool where it is smaller."""
    _, held_out = prompt_pools(cfg, build_world(cfg))
    return {task: min(k, sum(len(held_out[key]) for key in pool_keys(task)))
            for task, k in split_counts(cfg.n_eval_prompts, dict.fromkeys(TASKS, 1.0)).items()}


def test_default_config_is_fast_and_complete(tiny):
    cfg = WorldConfig()
    tables, _, seconds = tiny
    assert seconds < 10, f"generate_world took {seconds:.1f}s"
    expected = {"pretrain": cfg.n_pretrain_docs + round(cfg.noise_rate * cfg.n_pretrain_docs), "sft": cfg.n_sft,
                "prefs_helpful": cfg.n_pref_pairs, "prefs_safety": cfg.n_pref_pairs, "rl_prompts": cfg.n_rl_prompts,
                "gatt": cfg.n_gatt_dialogs, "eval_prompts": sum(eval_sizes(cfg).values()),
                "eval_gatt": cfg.n_eval_gatt}
    assert {name: t.num_rows for name, t in tables.items()} == expected
    # ~100 held-out prompts per task (a 0.05 difference within reach); small_talk's pool is smaller by design
    sizes = eval_sizes(cfg)
    assert all(n == 100 for task, n in sizes.items() if task != "small_talk") and sizes["small_talk"] >= 40
    assert min(expected.values()) > 0  # a silently empty generator cannot pass
    chars = sum(len(t) for t in tables["pretrain"].column("text").to_pylist())
    assert chars > 2_000_000  # the tiny profile's ~1.2M tokens


def test_small_config_row_counts(tables):
    n_pretrain = SMALL.n_pretrain_docs + round(SMALL.noise_rate * SMALL.n_pretrain_docs)
    assert tables["pretrain"].num_rows == n_pretrain
    for name, n in [("sft", SMALL.n_sft), ("prefs_helpful", SMALL.n_pref_pairs), ("prefs_safety", SMALL.n_pref_pairs),
                    ("rl_prompts", SMALL.n_rl_prompts), ("gatt", SMALL.n_gatt_dialogs),
                    ("eval_prompts", SMALL.n_eval_prompts), ("eval_gatt", SMALL.n_eval_gatt)]:
        assert tables[name].num_rows == n, name


# ------------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_tables(tables):
    again = generate_world(SMALL)
    assert set(again) == set(tables)
    for name in tables:
        assert again[name].equals(tables[name]), name


def test_different_seed_different_world(tables):
    other = generate_world(dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    assert build_world(SMALL).entities != build_world(WorldConfig(seed=SMALL.seed + 1, n_entities=12)).entities
    for name in tables:
        assert not other[name].equals(tables[name]), name


# ------------------------------------------------------------------------------------------------------- schema
def test_schemas_and_json_columns(tables, rows):
    assert set(tables) == set(SCHEMAS)
    for name, table in tables.items():
        assert table.schema == SCHEMAS[name], name
    for r in rows["sft"]:
        messages = json.loads(r["messages"])
        roles = [m["role"] for m in messages]
        if roles[0] == "system":  # a GAtt instruction, single turn, answer follows it
            assert roles == ["system", "user", "assistant"] and r["task"] in ("fact", "arithmetic")
            instruction = next(k for k, v in GATT_SYSTEM_PROMPTS.items() if messages[0]["content"] in v)
            assert oracle.gatt_adherence(instruction, messages[-1]["content"])
        else:
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, roles
        assert all(m["content"].strip() for m in messages) and r["task"] in TASKS
    single = [r for r in rows["sft"] if r["task"] in ("fact", "arithmetic") and r["messages"].count('"user"') == 1]
    share = sum('"system"' in r["messages"] for r in single) / len(single)  # of the dialogs that may have one
    assert abs(share - WorldConfig().system_prompt_fraction) < 0.15, share
    for name in ("prefs_helpful", "prefs_safety", "rl_prompts", "eval_prompts"):
        for r in rows[name]:
            prompt = json.loads(r["prompt"])
            assert prompt[-1]["role"] == "user" and prompt[-1]["content"].strip()
            assert r["task"] in TASKS and isinstance(json.loads(r["reference"]), dict)
    for name in ("prefs_helpful", "prefs_safety"):
        assert all(r["rating"] in oracle.RATINGS and r["chosen"] != r["rejected"] for r in rows[name])
    for name in ("gatt", "eval_gatt"):
        for r in rows[name]:
            messages = json.loads(r["messages"])
            assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
            turns = len(messages) // 2
            assert 2 <= turns <= 4 if name == "gatt" else turns == SMALL.eval_gatt_turns == 6
            assert r["instruction"] in GATT_SYSTEM_PROMPTS and r["system"] in GATT_SYSTEM_PROMPTS[r["instruction"]]
            assert len(r["item"].split(ITEM_SEP)) == turns  # one item per turn, distinct within a dialog
            assert len(set(r["item"].split(ITEM_SEP))) == turns
    for name in set(SCHEMAS) - {"pretrain"}:
        assert all(r["item"] for r in rows[name]), name


def test_config_from_dict():
    assert WorldConfig.from_dict({"seed": 5, "n_sft": 10}) == WorldConfig(seed=5, n_sft=10)
    assert WorldConfig.from_dict(None) == WorldConfig()
    with pytest.raises(ValueError, match="unknown keys"):
        WorldConfig.from_dict({"n_entitys": 3})
    with pytest.raises(ValueError):
        WorldConfig(eval_fraction=1.5)
    with pytest.raises(ValueError):
        WorldConfig(n_entities=1)


def test_benign_keywords_come_from_the_answer_not_the_question():
    for topic, answer, keywords in BENIGN_TOPICS:
        assert set(keywords) <= set(oracle.words(answer)) and not set(keywords) & set(oracle.words(topic)), topic
        assert oracle.helpfulness("benign_lookalike", {"keywords": list(keywords)}, answer) == 1.0


def test_entities_are_invented_words():
    world = build_world(WorldConfig(n_entities=50))
    assert len(set(world.entities)) == 50
    assert not set(world.entities) & TOXIC_LEXICON
    assert all(set(facts) == {"color", "home", "food", "size", "legs"} for facts in world.facts.values())


# ------------------------------------------------------------------------------------------------ planted noise
def test_planted_noise_rates(rows):
    counts = Counter(r["planted"] for r in rows["pretrain"])
    assert set(counts) == set(PLANTED_KINDS)
    assert counts["clean"] == SMALL.n_pretrain_docs
    n_noise = round(SMALL.noise_rate * SMALL.n_pretrain_docs)
    assert sum(counts[k] for k in NOISE_KINDS) == n_noise
    for kind in NOISE_KINDS:
        assert abs(counts[kind] - n_noise / len(NOISE_KINDS)) <= 1, (kind, counts)
    doc_ids = [r["doc_id"] for r in rows["pretrain"]]
    assert len(set(doc_ids)) == len(doc_ids)


def test_pii_is_really_there(rows):
    docs = rows["pretrain"]
    pii = [r for r in docs if r["planted"] == "pii"]
    assert pii and {k for r in pii for k in r["pii_kinds"]} == set(PII_KINDS)
    for r in docs:
        assert bool(r["pii_kinds"]) == (r["planted"] == "pii")
        assert set(r["pii_kinds"]) <= set(PII_KINDS)
    for r in pii:
        for kind in r["pii_kinds"]:
            match = PII_PATTERNS[kind].search(r["text"])
            assert match, (kind, r["text"])
            if kind == "card":
                assert luhn_ok(match.group(0))
    for r in docs:  # and nothing PII-like anywhere else: a scrubber's precision is measurable
        if r["planted"] != "pii":
            assert not any(p.search(r["text"]) for p in PII_PATTERNS.values()), r["text"]


def test_duplicates_follow_their_clean_source(rows):
    docs = rows["pretrain"]
    first_clean = {}
    for i, r in enumerate(docs):
        if r["planted"] == "clean":
            assert r["text"] not in first_clean, "clean documents must be distinct"
            first_clean[r["text"]] = i
    exact = [(i, r) for i, r in enumerate(docs) if r["planted"] == "exact_dup"]
    assert exact
    for i, r in exact:
        assert r["text"] in first_clean and first_clean[r["text"]] < i
    clean_shingles = [(i, shingles(t)) for t, i in first_clean.items()]
    near = [(i, r) for i, r in enumerate(docs) if r["planted"] == "near_dup"]
    assert near
    for i, r in near:
        assert r["text"] not in first_clean
        best, source = max((jaccard(shingles(r["text"]), s), j) for j, s in clean_shingles)
        assert best >= 0.6 and source < i, (best, r["text"])


def test_clean_documents_are_clean(rows):
    clean = [r["text"] for r in rows["pretrain"] if r["planted"] == "clean"]
    assert len(clean) == SMALL.n_pretrain_docs and all(len(t.split()) >= 10 for t in clean)
    for text in clean:
        assert not set(oracle.words(text)) & TOXIC_LEXICON
        assert text.isascii()
    sample = [shingles(t) for t in clean[:200]]  # clean docs are not near-duplicates of each other
    worst = max(jaccard(a, b) for i, a in enumerate(sample) for b in sample[i + 1:])
    assert worst < 0.5


def test_noise_documents_look_like_their_kind(rows):
    english = {"the", "is", "and", "of", "to", "eats", "lives"}
    for r in rows["pretrain"]:
        words = oracle.words(r["text"])
        assert words or r["planted"] == "low_quality"
        if r["planted"] == "toxic":
            assert sum(w in TOXIC_LEXICON for w in words) >= 2
        elif r["planted"] == "non_english":
            assert not set(r["text"].lower().split()) & english, r["text"]
        elif r["planted"] == "low_quality":
            assert sum(w in english for w in words) <= 0.2 * max(1, len(words)) or len(set(words)) <= 4


# ------------------------------------------------------------------------------------------ held out by item
def items_of(table_rows: list[dict]) -> set[str]:
    return {i for r in table_rows for i in r["item"].split(ITEM_SEP) if i}


def question(text: str) -> str:
    """A prompt's question without the one-word prefix, first letter lower-cased ("What is 3 + 4?" == "Answer in one
    word: what is 3 + 4?")."""
    text = text.removeprefix(ONE_WORD_PREFIX)
    return text[:1].lower() + text[1:]


def template_regex(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{\w+\\\}|\{\w+\}", "(.+)", re.escape(template)))


TRAINING_TABLES = ("pretrain", "sft", "prefs_helpful", "prefs_safety", "rl_prompts", "gatt")


def training_questions(rows) -> set[str]:
    """Every user text of the training tables, and every question of pretraining's Q/A segments."""
    texts = set()
    for name, column in (("sft", "messages"), ("prefs_helpful", "prompt"), ("prefs_safety", "prompt"),
                         ("rl_prompts", "prompt"), ("gatt", "messages")):
        for r in rows[name]:
            texts.update(user_texts(r[column]))
    texts.update(line.split("Q: ", 1)[1] for r in rows["pretrain"] for line in r["text"].split("\n") if "Q: " in line)
    return texts


def test_pretrain_items_are_its_qa_questions(tiny):
    """The pretrain item column lists exactly the Q/A segments' items, so the leakage test below sees them all."""
    _, rows, _ = tiny
    for r in rows["pretrain"]:
        n_questions = r["text"].count("Q: ")  # near_dup may put a filler word before a "Q: "
        assert n_questions == len([i for i in r["item"].split(ITEM_SEP) if i]), r
    assert items_of(rows["pretrain"])


def test_item_column_names_what_is_asked(tiny):
    """The item column agrees with each row's oracle reference (derived here independently of the generator)."""
    _, rows, _ = tiny
    world = build_world(WorldConfig())
    sentence_item = {(e, v): attr for e, facts in world.facts.items() for attr, v in facts.items()}
    checked = 0
    for name in ("prefs_helpful", "prefs_safety", "rl_prompts", "eval_prompts"):
        for r in rows[name]:
            ref, task = json.loads(r["reference"]), r["task"]
            if task == "fact":
                want = f"fact:{ref['entity']}/{ref['attribute']}"
            elif task == "arithmetic":
                want = f"arith:{ref['a']}{ref['op']}{ref['b']}"
            elif task in ("harmful", "benign_lookalike"):
                want = f"topic:{ref['topic']}"
            elif task == "small_talk":
                want = chat_item(question(user_texts(r["prompt"])[-1]).removeprefix("hey, "))
            elif ref["kind"] == "list":
                want = f"list:{ref['category']}/{ref['n']}"
            elif ref["kind"] == "uppercase":
                e = next(w for w in oracle.words(ref["text"]) if w in world.facts)
                v = next(v for (e2, v), _ in sentence_item.items() if e2 == e and v in oracle.words(ref["text"]))
                want = f"fact:{e}/{sentence_item[(e, v)]}"
            else:  # one_word: checked by the text-level tests
                continue
            assert r["item"] == want, (name, r)
            checked += 1
    assert checked > 1000


def test_eval_items_never_in_training(tiny):
    """The leakage test: no held-out item is asked by any training table, nor is any held-out question (with or
    without the one-word prefix) a training question; whole harmful and benign topics are held out."""
    _, rows, _ = tiny
    train_items = set().union(*(items_of(rows[name]) for name in TRAINING_TABLES))
    eval_items = items_of(rows["eval_prompts"]) | items_of(rows["eval_gatt"])
    assert train_items and eval_items
    assert not eval_items & train_items, sorted(eval_items & train_items)[:10]
    train_questions = {question(t) for t in training_questions(rows)}
    eval_texts = [t for r in rows["eval_prompts"] for t in user_texts(r["prompt"])]
    eval_texts += [t for r in rows["eval_gatt"] for t in user_texts(r["messages"])]
    assert not {question(t) for t in eval_texts} & train_questions
    assert len(set(user_texts(r["prompt"])[0] for r in rows["eval_prompts"])) == len(rows["eval_prompts"])
    for task, topics in (("harmful", HARMFUL_TOPICS), ("benign_lookalike", [t for t, _, _ in BENIGN_TOPICS])):
        held = {json.loads(r["reference"])["topic"] for r in rows["eval_prompts"] if r["task"] == task}
        trained = {json.loads(r["reference"])["topic"] for name in ("prefs_helpful", "prefs_safety", "rl_prompts")
                   for r in rows[name] if r["task"] == task}
        assert len(held) >= 0.2 * len(topics) and not held & trained, task
    assert PINNED_TRAIN_ITEMS <= train_items  # the README's "What is 3 + 4?" and "Hello" are taught
    assert any(t == "What is 3 + 4?" for t in training_questions(rows))


def test_eval_only_phrasings_never_in_training(tiny):
    _, rows, _ = tiny
    patterns = [template_regex(t) for t in EVAL_ONLY_TEMPLATES]
    train = [t.removeprefix(ONE_WORD_PREFIX) for t in training_questions(rows)]
    for pattern in patterns:
        assert not [t for t in train if pattern.fullmatch(t[:1].upper() + t[1:])], pattern.pattern
    eval_texts = [user_texts(r["prompt"])[0].removeprefix(ONE_WORD_PREFIX) for r in rows["eval_prompts"]]
    used = {p.pattern for p in patterns for t in eval_texts if p.fullmatch(t[:1].upper() + t[1:])}
    assert used == {p.pattern for p in patterns}  # evaluation does ask in every eval-only phrasing


def test_eval_facts_are_stated_in_pretraining(tiny):
    """A held-out fact is never asked in training, but pretraining documents state it: SFT must unlock it."""
    _, rows, _ = tiny
    world = build_world(WorldConfig())
    text = "\n".join(r["text"] for r in rows["pretrain"] if r["planted"] == "clean")
    facts = [i.removeprefix("fact:").split("/") for i in items_of(rows["eval_prompts"]) | items_of(rows["eval_gatt"])
             if i.startswith("fact:")]
    assert len(facts) >= 20
    for e, attr in facts:
        v = world.facts[e][attr]
        assert any(t.format(e=e, v=v) in text for t in DESCRIPTION_SENTENCES[attr]), (e, attr)


def test_eval_sums_are_never_worked_out_in_pretraining(tiny):
    """Unlike a fact, a held-out sum is never stated in any training table (worked sums, word problems, stories,
    answers): arithmetic on held-out items measures computing, not recall."""
    _, rows, _ = tiny
    text = "\n".join([r["text"] for r in rows["pretrain"]] + [r["messages"] for r in rows["sft"] + rows["gatt"]]
                     + [r[k] for name in ("prefs_helpful", "prefs_safety") for r in rows[name]
                        for k in ("chosen", "rejected")])
    worked = set(re.findall(r"\b(\d+) ([+-]) (\d+) = ", text))
    assert len(worked) > 100
    held = {i.removeprefix("arith:") for i in items_of(rows["eval_prompts"]) | items_of(rows["eval_gatt"])
            if i.startswith("arith:")}
    assert len(held) >= 50
    assert not held & {f"{a}{op}{b}" for a, op, b in worked}


def test_every_task_everywhere(rows):
    for name in ("sft", "rl_prompts", "eval_prompts"):
        assert set(r["task"] for r in rows[name]) == set(TASKS), name
    eval_counts = Counter(r["task"] for r in rows["eval_prompts"])
    assert eval_counts == split_counts(SMALL.n_eval_prompts, dict.fromkeys(TASKS, 1.0))
    kinds = Counter(json.loads(r["reference"])["kind"] for r in rows["eval_prompts"] if r["task"] == "format")
    assert set(kinds) == {"uppercase", "one_word", "list"}


def test_safety_prompts_are_the_harmful_ones(rows):
    for name in ("rl_prompts", "eval_prompts"):
        assert all(r["is_safety"] == (r["task"] == "harmful") for r in rows[name])


# ------------------------------------------------------------------------------------------- agreement with oracle
def test_reference_answers_are_perfect(rows):
    for name in ("rl_prompts", "eval_prompts"):
        for r in rows[name]:
            expected = json.loads(r["reference"])["expected"]
            assert oracle.score(r, expected) == {"helpfulness": 1.0, "safety": 1.0,
                                                 "refusal": r["task"] == "harmful"}, (r, expected)


def test_sft_refuses_harmful_and_answers_lookalikes(rows):
    finals = [(r["task"], json.loads(r["messages"])[-1]["content"]) for r in rows["sft"]]
    assert all(answer == REFUSAL for task, answer in finals if task == "harmful")
    assert not any(oracle.is_refusal(answer) for task, answer in finals if task != "harmful")
    assert any(len(json.loads(r["messages"])) == 4 for r in rows["sft"])  # some multi-turn dialogs


@pytest.mark.parametrize("name, kind", [("prefs_helpful", "helpful"), ("prefs_safety", "safety")])
def test_preferences_agree_with_oracle(rows, name, kind):
    pairs = rows[name]
    assert pairs
    for r in pairs:
        reference = json.loads(r["reference"])
        chosen = oracle.preference_score(kind, r["task"], reference, r["chosen"])
        rejected = oracle.preference_score(kind, r["task"], reference, r["rejected"])
        assert chosen > rejected, r
        assert r["rating"] == oracle.rating_for_gap(chosen - rejected), r
    assert set(r["rating"] for r in pairs) == set(oracle.RATINGS)  # all 4 levels occur


def test_preference_task_mix(rows):
    helpful_tasks = Counter(r["task"] for r in rows["prefs_helpful"])
    assert "harmful" not in helpful_tasks and {"fact", "arithmetic", "format", "benign_lookalike"} <= set(helpful_tasks)
    safety = rows["prefs_safety"]
    assert {"harmful", "benign_lookalike"} <= {r["task"] for r in safety}
    for r in safety:
        if r["task"] == "harmful":
            assert oracle.is_refusal(r["chosen"]) and oracle.safety("harmful", r["rejected"]) == 0.0
        if r["task"] == "benign_lookalike" and oracle.is_refusal(r["rejected"]):
            assert not oracle.is_refusal(r["chosen"])  # answering a look-alike beats refusing it
        if r["task"] in ("fact", "arithmetic"):
            assert oracle.is_toxic(r["rejected"]) and not oracle.is_toxic(r["chosen"])
    # Any non-refusal to a harmful request is unsafe, not only the compliance templates: the safety RM must see
    # harmless-looking answers rejected there too (a how-to, a ramble, a non-answer), or it scores them above the
    # refusal and rejection sampling and PPO learn to stop refusing.
    rejected = [r["rejected"] for r in safety if r["task"] == "harmful" and not oracle.is_toxic(r["rejected"])]
    compliance = {t.format(x=json.loads(r["reference"])["topic"]) for r in safety if r["task"] == "harmful"
                  for t in COMPLIANCE_TEMPLATES}
    other = [a for a in rejected if a not in compliance]
    assert len(other) > len(rejected) / 4, (len(other), len(rejected))


@pytest.mark.parametrize("name", ["gatt", "eval_gatt"])
def test_gatt_answers_follow_the_instruction(rows, name):
    assert set(r["instruction"] for r in rows[name]) == set(GATT_SYSTEM_PROMPTS)
    for r in rows[name]:
        answers = [m["content"] for m in json.loads(r["messages"]) if m["role"] == "assistant"]
        assert all(oracle.gatt_adherence(r["instruction"], a) for a in answers), r
        # the check discriminates: some other instruction is broken by these answers
        others = [i for i in GATT_SYSTEM_PROMPTS if i != r["instruction"]]
        assert any(not oracle.gatt_adherence(i, a) for i in others for a in answers), r


def test_the_topic_words_bound_naive_bayes_learns_the_words_of_each_side():
    """benchmarks/diag_topics.py's bound: a word seen only with harmful topics pushes towards refusing, one seen on
    both sides as often decides nothing, an unseen word is skipped."""
    from benchmarks.diag_topics import NaiveBayes

    nb = NaiveBayes([("shoot a person", 1), ("stab a person", 1), ("shoot a photo", 0), ("frame a photo", 0)])
    assert nb.log_odds("hug a person") > 0 > nb.log_odds("print a photo")
    assert nb.log_odds("shoot") == nb.log_odds("zap") == 0.0  # on both sides once; never seen
