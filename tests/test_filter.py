"""components/data/filter.py and dedup.py: each rule on hand-written positives and negatives, MinHash against exact
Jaccard, dedup on a mini corpus, and the Ray Data pipeline end to end on a generated corpus with planted labels (exact
report numbers)."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.data import filter as flt
from components.data.dedup import exact_duplicates, exact_hash, minhash_signatures, near_duplicates, normalize
from components.data.filter import (FilterConfig, english_ratio, is_non_english, luhn_valid, quality_reason, run_filter,
                                    scrub_pii, toxicity_score)

CFG = FilterConfig()


# ------------------------------------------------------------------------------------------------------------ PII
@pytest.mark.parametrize("text, scrubbed, kinds", [
    ("Write to mira.khan@mail.test today.", "Write to <EMAIL> today.", ["email"]),
    ("Mail j_doe+news@sub.example.org, please", "Mail <EMAIL>, please", ["email"]),
    ("Call (923) 862-3948 now.", "Call <PHONE> now.", ["phone"]),
    ("Call 923-862-3948.", "Call <PHONE>.", ["phone"]),
    ("Call +1 923 862 3948.", "Call <PHONE>.", ["phone"]),
    ("Card 4111 1111 1111 1111 ok", "Card <CARD> ok", ["card"]),
    ("Card 5464-1088-0364-6222.", "Card <CARD>.", ["card"]),
    ("My id number is 123-45-6789.", "My id number is <ID>.", ["id_number"]),
    ("Connect to 192.168.0.1 to see.", "Connect to <IP> to see.", ["ip"]),
    ("Server at 10.0.0.255.", "Server at <IP>.", ["ip"]),
    ("ip 1.2.3.4 and mail a.b@c.io, call 212-555-0100",
     "ip <IP> and mail <EMAIL>, call <PHONE>", ["email", "phone", "ip"]),
])
def test_scrub_pii_positives(text, scrubbed, kinds):
    assert scrub_pii(text) == (scrubbed, kinds)


@pytest.mark.parametrize("text", [
    "Upgrade to version 1.2.3.4 today.",  # a version string, not an IP (decided: "version"/"v" prefix = version)
    "Built with v1.2.3.4.",
    "Not an address: 1.2.3.4.5 or 999.1.1.1 or 01.02.03.04.",
    "A plain number 12345 and 18 + 11 = 29.",
    "Order 4111 1111 1111 1112 fails Luhn.",  # 16 digits, Luhn fails: not a card
    "Date 2024-01-15 and ratio 3-4.",
    "Write to me@home or to @user.",
    "Score 10 - 5 = 5. 123 456 is a number.",
])
def test_scrub_pii_negatives(text):
    assert scrub_pii(text) == (text, [])


def test_scrub_pii_luhn_switch():
    assert scrub_pii("Order 4111 1111 1111 1112.", luhn_check=False) == ("Order <CARD>.", ["card"])


def test_luhn():
    assert luhn_valid("79927398713") and luhn_valid("4111111111111111") and luhn_valid("5464108803646222")
    assert not luhn_valid("79927398710") and not luhn_valid("4111111111111112") and not luhn_valid("0")


# -------------------------------------------------------------------------------------------------------- quality
PROSE = ("The zorp lives in the forest and it eats berries every morning. "
         "Every day the zorp walks to the river with its friend, and they look at the fish.")


@pytest.mark.parametrize("text, reason", [
    (PROSE, None),
    ("Too short to keep.", "length"),
    ("# $ % & * @ ! ? ~ ^ + = <> | / {} [] hello world", "symbols"),
    ("buy now " * 20, "repetition"),
    ("win big today " * 15, "repetition"),
    ("The same line again.\n" * 4 + PROSE, "repetition"),  # 3 of 5 lines repeat an earlier one
    ("xqv zvbrt plomk fribb quazz dronk vlimp skree twoob gnarf zzut plekk yomp brizz", "function_words"),
    ("15 - 5 = 10. 6 - 0 = 6.\n20 + 9 = 29. 19 - 17 = 2.", None),  # arithmetic: no words, no evidence, kept
    ("Der Hund wohnt im Wald und er frisst Beeren. Die Katze ist klein und sie schläft am See.", None),  # language's
])
def test_quality_reason(text, reason):
    assert quality_reason(text, CFG) == reason


def test_top_and_dup_ngram_fractions():
    words = "a b c a b d".split()  # top 2-gram "a b" occurs twice: 2 * 2 chars / 6 chars
    assert flt._top_ngram_frac(words, 2, 6) == pytest.approx(4 / 6)
    assert flt._top_ngram_frac("a a a a".split(), 2, 4) == 1.0  # overlapping "a a" x3 would be 6/4: clamped
    words = "x y z x y z w".split()  # 3-gram "x y z" twice covers the first six words (6 of 7 chars)
    assert flt._dup_ngram_frac(words, 3, 7) == pytest.approx(6 / 7)
    assert flt._dup_ngram_frac("a b c d".split(), 2, 4) == 0.0


# ------------------------------------------------------------------------------------------ language and toxicity
@pytest.mark.parametrize("text, non_english", [
    (PROSE, False),
    ("El perro vive en el bosque y come bayas. Hoy hace buen tiempo y los niños juegan en la calle.", True),
    ("Der Hund wohnt im Wald und er frisst Beeren. Die Katze ist klein und sie schläft am See.", True),
    ("Le chien habite dans la forêt et il mange des baies. Je ne sais pas où est la gare.", True),
    ("El perro vive en el bosque.", False),  # fewer than min_alpha_words: too little evidence
])
def test_language(text, non_english):
    assert is_non_english(text, CFG) is non_english


def test_english_ratio_exact():
    assert english_ratio("The cat and a dog, 42!") == (pytest.approx(3 / 5), 5)  # the, and, a of 5 words


def test_toxicity_score():
    lexicon = frozenset(FilterConfig().toxic_lexicon)
    assert toxicity_score("You are an IDIOT.", lexicon) == 0.25
    assert toxicity_score("Stupidity is not a word in the lexicon.", lexicon) == 0.0  # whole words only
    assert toxicity_score("", lexicon) == 0.0
    cfg = FilterConfig.from_dict({"toxic_lexicon": ["Blorkhead"]})  # the world's lexicon comes in as a YAML list
    assert cfg.toxic_lexicon == ("blorkhead",)
    assert toxicity_score("the blorkhead ate an idiot", frozenset(cfg.toxic_lexicon)) == 0.2


def test_config_rejects_unknown_and_inconsistent_keys():
    with pytest.raises(ValueError, match="unknown keys \\['min_wrods'\\]"):
        FilterConfig.from_dict({"min_wrods": 3})
    with pytest.raises(ValueError, match="multiple of lsh_bands"):
        FilterConfig(num_perm=100, lsh_bands=32)
    assert FilterConfig.from_dict({"min_words": 3}).min_words == 3
    assert FilterConfig.from_dict(FilterConfig().to_dict()) == FilterConfig()


# ---------------------------------------------------------------------------------------------------------- dedup
def test_normalize_and_exact_hash():
    assert normalize("  Hello,\n World!! ") == "hello world"
    assert exact_hash("Hello, World!") == exact_hash("hello   world")
    assert exact_hash("Hello, World!") != exact_hash("Hello, Word!")


def _shingles(text: str, k: int = 3) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    return {tuple(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(400)]
    base = [rng.choice(vocab) for _ in range(150)]
    texts, exact = [" ".join(base)], []
    for n_edits in (0, 2, 5, 10, 20, 40, 80, 150):
        words = list(base)
        for _ in range(n_edits):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        texts.append(" ".join(words))
        a, b = _shingles(texts[0]), _shingles(texts[-1])
        exact.append(len(a & b) / len(a | b))
    sig = minhash_signatures(texts, num_perm=256)
    est = (sig[1:] == sig[0]).mean(axis=1)
    assert exact[0] == 1.0 and est[0] == 1.0 and exact[-1] < 0.05
    assert np.abs(est - np.array(exact)).max() < 0.1  # std of the estimate is <= 0.5/sqrt(256) = 0.03
    # A document's signature does not depend on its batch neighbours or its position in the batch.
    np.testing.assert_array_equal(minhash_signatures(texts[3:1:-1], num_perm=256), sig[[3, 2]])
    assert minhash_signatures([]).shape == (0, 128)
    short = minhash_signatures(["hi", "hi there", "", "hi"])  # shorter than a shingle: one shingle of all words
    assert (short[0] == short[3]).all() and (short[0] != short[1]).any()


def test_minhash_is_stable_across_processes():
    """Ray workers are separate processes with their own PYTHONHASHSEED: signatures must not depend on it."""
    code = ("from components.data.dedup import minhash_signatures, exact_hash;"
            "print(minhash_signatures(['the quick brown fox jumps'])[0, :4].tolist(), exact_hash('a b'))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1
    here = f"{minhash_signatures(['the quick brown fox jumps'])[0, :4].tolist()} {exact_hash('a b')}\n"
    assert outs == {here}


_ZORP = ("the zorp lives in the forest and eats berries every single morning with its many friends then it walks "
         "to the river to drink")
_BLICKET = ("a blicket sleeps under the old stone bridge while the river runs cold and fast below it until the sun "
            "comes up")
MINI = [
    _ZORP,  # 0
    _ZORP.capitalize().replace("forest", "forest,") + "!",  # 1: exact duplicate of 0 (same normal form)
    _ZORP.replace("eats", "really eats"),  # 2: near duplicate of 0 (one word inserted)
    _BLICKET,  # 3
    _BLICKET.replace("fast", "very fast"),  # 4: near duplicate of 3
    _ZORP.replace("forest and eats berries", "desert and drinks water").replace("morning", "evening"),  # 5: related
    "completely different words about a tiny red machine that counts numbers all day long",  # 6
]


def test_exact_and_near_duplicates_on_mini_corpus():
    assert exact_duplicates([exact_hash(t) for t in MINI]) == [1]
    sig = minhash_signatures(MINI)
    assert near_duplicates(sig, bands=32, threshold=0.7) == [1, 2, 4]  # 1 is also an exact duplicate
    j05 = len(_shingles(MINI[0]) & _shingles(MINI[5])) / len(_shingles(MINI[0]) | _shingles(MINI[5]))
    assert 0.1 < j05 < 0.5  # shares "the zorp lives in the" and "every single": similar, not a duplicate
    # The first occurrence is kept: reversed, MINI 4 is kept and 3 dropped; 2 is kept and 1 and 0 (its near
    # duplicates, reversed positions 5 and 6) are dropped.
    assert near_duplicates(sig[::-1], bands=32, threshold=0.7) == [3, 5, 6]
    assert near_duplicates(sig, bands=32, threshold=1.0) == [1]


# ---------------------------------------------------------------------------------------------- the pipeline
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
_NOUNS = sorted({a + b for a, b in itertools.product(_SYLLABLES, repeat=2)} - flt.FUNCTION_WORDS
                - set(flt.DEFAULT_TOXIC_LEXICON))
_TEMPLATES = ("The {} and the {} went to the {} with a {}.", "A {} was sitting near the {} because it was {}.",
              "Every {} has a {}, but no {} has a {}.", "They said that the {} would be in the {} after the {}.")


def _clean_doc(rng: random.Random) -> str:
    sentences = []
    for _ in range(6):
        t = rng.choice(_TEMPLATES)
        sentences.append(t.format(*(rng.choice(_NOUNS) for _ in range(t.count("{}")))))
    return " ".join(sentences)


def _labelled_corpus(seed: int = 0) -> tuple[pa.Table, set[str]]:
    """~70 documents with planted labels and two deliberate traps per rule kind; returns (table, expected kept ids)."""
    rng = random.Random(seed)
    rows: list[tuple[str, str, list[str], bool]] = []  # text, planted, pii_kinds, expected kept
    clean = [_clean_doc(rng) for _ in range(40)]
    rows += [(t, "clean", [], True) for t in clean]
    rows.append((_clean_doc(rng) + " The parcel code is 4111 1111 1111 1111 here.", "clean", [], True))  # trap: pii FP
    rows.append((_clean_doc(rng) + " What a stupid day.", "clean", [], False))  # trap: toxicity false positive
    for value, kinds in (("Write to ana.kim@example.com today.", ["email"]), ("Call (923) 862-3948 now.", ["phone"]),
                         ("My card is 5464 1088 0364 6222.", ["card"]), ("My id is 123-45-6789.", ["id_number"]),
                         ("The server is at 203.0.113.7 now.", ["ip"]),
                         ("Mail sam@mail.test or call 212-555-0100.", ["email", "phone"])):
        rows.append((_clean_doc(rng) + " " + value, "pii", kinds, True))
    rows += [(clean[i], "exact_dup", [], False) for i in (1, 2, 3)]
    rows.append(("  " + clean[4].upper().replace(".", "!"), "exact_dup", [], False))  # same normal form
    for i in (5, 6, 7):
        words = clean[i].split()
        rows.append((" ".join(words[:20] + ["really"] + words[20:]), "near_dup", [], False))
    rows.append((clean[8].replace(".", " ."), "near_dup", [], False))  # trap: caught by exact dedup (normal form)
    rows += [("# $ % & * @ ! ? ~ ^ + = < > | / { } [ ] ## $$ %% ** !! ??", "low_quality", [], False),
             ("buy now " * 25, "low_quality", [], False), ("Click here.", "low_quality", [], False),
             ("xqv zvbrt plomk fribb quazz dronk vlimp skree twoob gnarf zzut plekk yomp brizz grolt", "low_quality",
              [], False)]
    rows += [(_clean_doc(rng) + f" You are a {w}, a real {w}.", "toxic", [], False) for w in ("idiot", "moron", "jerk")]
    rows.append((_clean_doc(rng) + " You are a nincompoop.", "toxic", [], True))  # trap: not in the lexicon
    rows += [("El perro vive en el bosque y come bayas. Hoy hace buen tiempo y los niños juegan en la calle.",
              "non_english", [], False),
             ("Der Hund wohnt im Wald und er frisst Beeren. Die Katze ist klein und sie schläft am See.",
              "non_english", [], False),
             ("Le chien habite dans la forêt et il mange des baies. Je ne sais pas où est la gare.", "non_english",
              [], False)]
    # Shuffle, but every duplicate must come after its source: sources are rows 0..8 (clean[0..8]), placed first.
    head, tail = rows[:9], rows[9:]
    rng.shuffle(tail)
    rows = head + tail
    table = pa.table({"doc_id": [f"doc-{i:04d}" for i in range(len(rows))], "text": [r[0] for r in rows],
                      "planted": [r[1] for r in rows],
                      "pii_kinds": pa.array([r[2] for r in rows], pa.list_(pa.string()))})
    kept = {f"doc-{i:04d}" for i, r in enumerate(rows) if r[3]}
    return table, kept


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> tuple[Path, set[str]]:
    table, kept = _labelled_corpus()
    path = tmp_path_factory.mktemp("raw") / "pretrain.parquet"
    pq.write_table(table, path)
    return path, kept


def _read_out(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])


def test_pipeline_end_to_end(ray_local, corpus_file, tmp_path):
    path, expected_kept = corpus_file
    out = tmp_path / "clean"
    (tmp_path / ".clean.tmp-deadbeef").mkdir()  # left by a killed run: must be cleaned up
    report = run_filter([str(path)], str(out), CFG)

    assert report["documents_in"] == 67 and report["documents_out"] == 48 == len(expected_kept)
    assert report["removed"] == {"quality": 4, "language": 3, "toxicity": 4, "exact_dup": 5, "near_dup": 3}
    assert report["quality_reasons"] == {"length": 1, "symbols": 1, "repetition": 1, "function_words": 1}
    assert report["pii_docs_scrubbed"] == 7
    assert report["pii_scrubbed"] == {"email": 2, "phone": 2, "card": 2, "id_number": 1, "ip": 1}
    # Hand-computed from the traps: a clean doc with a card-like number (pii FP), a clean doc with "stupid"
    # (toxicity FP), a toxic doc outside the lexicon (toxicity FN), a near_dup caught by exact dedup (counts for both).
    assert report["precision"] == {"pii": round(6 / 7, 4), "quality": 1.0, "language": 1.0, "toxicity": 0.75,
                                   "exact_dup": 1.0, "near_dup": 1.0}
    assert report["recall"] == {"pii": 1.0, "quality": 1.0, "language": 1.0, "toxicity": 0.75, "exact_dup": 1.0,
                                "near_dup": 1.0}
    assert report["pii_kind_precision"] == {"email": 1.0, "phone": 1.0, "card": 0.5, "id_number": 1.0, "ip": 1.0}
    assert report["pii_kind_recall"] == {k: 1.0 for k in flt.PII_KINDS}
    assert report["confusion"]["exact_dup"] == {"exact_dup": 4, "near_dup": 1}
    assert report["confusion"]["kept"] == {"clean": 41, "pii": 6, "toxic": 1}
    assert report["rule_order"] == list(flt.RULE_ORDER)

    result = _read_out(out)
    assert result.column_names == ["doc_id", "text"]
    ids = result.column("doc_id").to_pylist()
    assert ids == sorted(expected_kept)  # exactly the expected documents, in input order
    texts = result.column("text").to_pylist()
    assert all(scrub_pii(t)[1] == [] for t in texts) and not any("@" in t or "6789" in t for t in texts)
    assert sum("<EMAIL>" in t for t in texts) == 2 and sum("<CARD>" in t for t in texts) == 2
    assert len({normalize(t) for t in texts}) == len(texts)
    assert near_duplicates(minhash_signatures(texts), CFG.lsh_bands, CFG.near_dup_threshold) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]  # no temp or old folders left beside it


def test_pipeline_with_unlabelled_documents(ray_local, corpus_file, tmp_path):
    """Real-source documents (planted null, components/data/ingest.py) go through every rule but not into the scores."""
    path, expected_kept = corpus_file
    labelled = pq.read_table(path)
    texts = labelled.column("text").to_pylist()
    rng = random.Random(99)
    unlabelled = [_clean_doc(rng), texts[0], "buy now " * 25, _clean_doc(rng) + " You are a moron, a real moron."]
    real = pa.table({"doc_id": [f"src000-{i:09d}" for i in range(4)], "text": unlabelled,
                     "planted": pa.array([None] * 4, pa.string()),
                     "pii_kinds": pa.array([None] * 4, pa.list_(pa.string()))})
    src = tmp_path / "mixed.parquet"
    pq.write_table(pa.concat_tables([labelled, real]), src)
    report = run_filter([str(src)], str(tmp_path / "clean"), CFG)
    assert report["documents_in"] == 71 and report["documents_out"] == 49
    assert report["unlabelled"] == {"documents_in": 4, "documents_out": 1, "removed": {
        "quality": 1, "language": 0, "toxicity": 1, "exact_dup": 1, "near_dup": 0}}
    # The scores are those of the labelled documents alone (test_pipeline_end_to_end).
    assert report["precision"] == {"pii": round(6 / 7, 4), "quality": 1.0, "language": 1.0, "toxicity": 0.75,
                                   "exact_dup": 1.0, "near_dup": 1.0}
    assert report["recall"]["toxicity"] == 0.75 and report["recall"]["exact_dup"] == 1.0
    assert report["pii_kind_precision"]["card"] == 0.5 and "unlabelled" not in report["planted"]
    assert report["confusion"]["kept"] == {"clean": 41, "pii": 6, "toxic": 1, "unlabelled": 1}
    assert report["confusion"]["exact_dup"] == {"exact_dup": 4, "near_dup": 1, "unlabelled": 1}
    assert set(_read_out(tmp_path / "clean").column("doc_id").to_pylist()) == expected_kept | {"src000-000000000"}


def test_report_with_no_labelled_document():
    meta = pa.table({"doc_id": ["a", "b"], "pii_found": pa.array([["email"], []], pa.list_(pa.string())),
                     "quality_reason": pa.array([None, "length"], pa.string())})
    labels = pa.table({"doc_id": ["a", "b"], "planted": pa.array([None, None], pa.string())})
    report = flt._report(meta, [None, "quality"], labels)
    assert report["labels_present"] is False and "precision" not in report
    assert report["unlabelled"] == {"documents_in": 2, "documents_out": 1, "removed": {
        "quality": 1, "language": 0, "toxicity": 0, "exact_dup": 0, "near_dup": 0}}
    assert report["pii_docs_scrubbed"] == 1


def test_pipeline_never_reads_labels_and_replaces_output(ray_local, corpus_file, tmp_path):
    path, expected_kept = corpus_file
    lying = pq.read_table(path)
    lying = lying.set_column(2, "planted", pa.array(["clean"] * lying.num_rows))  # every label says clean
    src = tmp_path / "lying.parquet"
    pq.write_table(lying, src)
    out = tmp_path / "clean"
    out.mkdir()
    (out / "stale.parquet").write_bytes(b"old")  # the whole folder is replaced, not merged into
    report = run_filter([str(src)], str(out), CFG)
    assert set(_read_out(out).column("doc_id").to_pylist()) == expected_kept
    assert [p.name for p in out.iterdir()] and not (out / "stale.parquet").exists()
    # Same decisions, different scores: nothing is labelled low_quality now, so recall is undefined.
    assert report["removed"] == {"quality": 4, "language": 3, "toxicity": 4, "exact_dup": 5, "near_dup": 3}
    assert report["precision"]["quality"] == 0.0 and report["recall"]["quality"] is None


def test_pipeline_without_labels_and_failed_write_keeps_old_output(ray_local, corpus_file, tmp_path, monkeypatch):
    path, _ = corpus_file
    src = tmp_path / "unlabelled.parquet"
    pq.write_table(pq.read_table(path).select(["doc_id", "text"]), src)
    out = tmp_path / "clean"
    out.mkdir()
    (out / "part-old.parquet").write_bytes(b"previous corpus")

    def killed(tmp, dst):
        raise RuntimeError("killed before the rename")

    monkeypatch.setattr(flt, "_replace_dir", killed)
    with pytest.raises(RuntimeError, match="killed"):
        run_filter([str(src)], str(out), CFG)
    assert [p.name for p in out.iterdir()] == ["part-old.parquet"]  # the previous output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "unlabelled.parquet"]  # tmp folder removed
    monkeypatch.undo()
    report = run_filter([str(src)], str(out), CFG)
    assert report["labels_present"] is False and "precision" not in report and report["documents_out"] == 48


def test_pipeline_bad_input(ray_local, tmp_path):
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"doc_id": ["a"], "body": ["hello"]}), no_text)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['text'\]"):
        run_filter([str(no_text)], str(tmp_path / "out"), CFG)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"doc_id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), empty)
    with pytest.raises(ValueError, match="holds no documents"):
        run_filter([str(empty)], str(tmp_path / "out"), CFG)
    with pytest.raises(ValueError, match="no input paths"):
        run_filter([], str(tmp_path / "out"), CFG)
    dup_ids = tmp_path / "dup_ids.parquet"
    pq.write_table(pa.table({"doc_id": ["a", "a"], "text": [PROSE, PROSE + " More."]}), dup_ids)
    with pytest.raises(ValueError, match="doc_id must be unique"):
        run_filter([str(dup_ids)], str(tmp_path / "out"), CFG)
    assert not (tmp_path / "out").exists()


def test_pipeline_throughput_20k_documents(ray_local, tmp_path):
    """~20k short documents well under a minute on 2 cores (Ray already started)."""
    rng = random.Random(1)
    texts = [_clean_doc(rng) for _ in range(20_000)]
    src = tmp_path / "big.parquet"
    pq.write_table(pa.table({"doc_id": [f"d{i:06d}" for i in range(len(texts))], "text": texts}), src)
    start = time.perf_counter()
    report = run_filter([str(src)], str(tmp_path / "clean"), CFG)
    seconds = time.perf_counter() - start
    assert report["documents_in"] == 20_000 and report["documents_out"] == 20_000
    assert seconds < 45, f"20k documents took {seconds:.1f} s"
