"""The `filter` stage's work: pretraining-data filtering on Ray Data (Llama 2 §2.1: remove personal information,
deduplicate, keep quality text) with a report measured against the synthetic world's planted labels.

Per document (Ray Data `map_batches` over Arrow batches, in parallel):
  1. PII scrub: emails, phones, card numbers (Luhn-checked), SSN-like ids and IPv4 addresses are replaced by typed
     placeholders (<EMAIL>, <PHONE>, <CARD>, <ID>, <IP>). Scrubbing rewrites text, it never removes a document;
     every later rule sees the scrubbed text (so two copies that differ only in PII are duplicates).
  2. quality (Gopher-style, Rae et al. 2021): word count, symbol ratio, repeated lines and n-grams, function words.
  3. language: English stop-word ratio (no model).
  4. toxicity: fraction of words in a lexicon (the pipeline passes the world's; a small built-in one by default).
  5. the keys of the global steps: a hash of the normalised text and a MinHash signature of its word shingles.
Globally (driver, over the small (doc_id, hash, signature) columns of the survivors, in doc_id order; the keys and
both passes are components/data/dedup.py):
  6. exact dedup: keep the first document of each normalised-text hash.
  7. near dedup: MinHash + LSH banding; a candidate pair is confirmed by the signature's Jaccard estimate.

Attribution: a removed document is counted once, under the first rule of RULE_ORDER that removes it. Quality runs
before language because its checks are language-agnostic (its function-word check uses a multilingual list, so
foreign prose passes it and is attributed to the language rule, while gibberish fails it).

The planted labels (`planted`, `pii_kinds`) never enter the filtering pipeline: only doc_id and text are read for it;
the labels are read separately, afterwards, to score each rule (METRIC_DEFINITIONS gives the exact definitions).
Documents from real sources (components/data/ingest.py) have planted null: they go through every rule like the others,
are left out of precision/recall, and are counted apart in the report's `unlabelled` section.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pad

from components.common import config_from_dict
from components.data.dedup import exact_duplicates, hash_normalized, minhash_words, near_duplicates, normalize

__all__ = ["FilterConfig", "run_filter", "scrub_pii", "luhn_valid", "quality_reason", "english_ratio",
           "is_non_english", "toxicity_score", "PII_KINDS", "PLACEHOLDER", "RULE_ORDER", "RULE_LABEL",
           "QUALITY_REASONS", "DEFAULT_TOXIC_LEXICON", "METRIC_DEFINITIONS"]

PII_KINDS = ("email", "phone", "card", "id_number", "ip")
PLACEHOLDER = {"email": "<EMAIL>", "phone": "<PHONE>", "card": "<CARD>", "id_number": "<ID>", "ip": "<IP>"}
RULE_ORDER = ("quality", "language", "toxicity", "exact_dup", "near_dup")  # removal rules, in attribution order
# Which planted label each rule is scored against (pii scrubbing is scored too, though it removes nothing).
RULE_LABEL = {"pii": "pii", "quality": "low_quality", "language": "non_english", "toxicity": "toxic",
              "exact_dup": "exact_dup", "near_dup": "near_dup"}
DEDUP_LABELS = frozenset({"exact_dup", "near_dup"})
UNLABELLED = "unlabelled"  # the confusion column of documents whose planted label is null (real sources)
QUALITY_REASONS = ("length", "symbols", "repetition", "function_words")  # quality's sub-checks, in order

# A small generic insult list; the pipeline passes the world's lexicon instead (flows/filter.py).
DEFAULT_TOXIC_LEXICON = ("idiot", "moron", "stupid", "dumb", "loser", "jerk", "scumbag", "creep", "imbecile",
                         "dimwit", "bastard", "asshole", "retard", "shithead", "dipshit")


@dataclass(frozen=True)
class FilterConfig:
    """Every threshold of the filter; defaults are the tiny profile's (calibrated on the synthetic world)."""

    # PII
    luhn_check: bool = True  # a card-like digit run is a card only if it passes Luhn (plain 13-19 digit ids survive)
    # quality (remove when any fails); Gopher's values where they transfer, looser where templated text repeats
    min_words: int = 8  # fewer whitespace words = a fragment (Gopher: 50; the world's documents are short)
    max_words: int = 100_000  # Gopher's upper bound
    max_symbol_ratio: float = 0.5  # words without any letter or digit ("#$%", "~^") / all words; "7 + 5 = 12." is 0.4
    max_dup_line_frac: float = 0.5  # fraction of non-empty lines repeating an earlier one (Gopher 0.3; short Q/A
    #                                 answer lines such as "A: 4" legitimately repeat: clean world docs reach 0.33)
    top_ngram_n: int = 2  # Gopher's "most frequent n-gram" check uses n = 2, 3, 4; one n is enough here
    max_top_ngram_frac: float = 0.5  # chars covered by the most frequent n-gram / all word chars (Gopher 0.20; the
    #                                  world's templated "The zorp is ... The zorp eats ..." reaches 0.37, spam ~1)
    dup_ngram_n: int = 10  # Gopher's "duplicate n-gram" check uses n = 5..10
    max_dup_ngram_frac: float = 0.9  # chars inside n-grams occurring more than once / all word chars (Gopher 0.10
    #                                  at n=10; a short world doc that repeats one sentence reaches 0.85, spam 1.0)
    min_function_word_ratio: float = 0.12  # function words / alphabetic words: Gopher's stop-word rule as a ratio,
    #   with a multilingual list (see module docstring); prose >= 0.18 (es/de/fr >= 0.25), random letters <= 0.10
    min_alpha_words: int = 12  # below this many alphabetic words (mostly arithmetic: "7 + 5 = 12. Q: Compute 3 + 4.")
    #                            the function-word and language checks have too little evidence and do not fire
    # language
    min_english_ratio: float = 0.25  # English stop words / alphabetic words: world English >= 0.36, es/de/fr <= 0.15
    # toxicity
    max_toxic_fraction: float = 0.01  # remove when more than 1% of words are in the lexicon (world toxic >= 0.019)
    toxic_lexicon: tuple[str, ...] = DEFAULT_TOXIC_LEXICON  # lower-case words
    # dedup
    shingle_size: int = 3  # words per shingle for MinHash (a 1-word edit changes at most 3 shingles)
    num_perm: int = 128  # MinHash hash functions
    lsh_bands: int = 32  # bands of num_perm // lsh_bands = 4 rows. LSH's own threshold (1/32)^(1/4) = 0.42 sits well
    #                      below near_dup_threshold, so LSH misses almost no pair at J >= 0.7 (P = (1-0.7^4)^32 =
    #                      1.5e-4) and the signature check below keeps precision
    near_dup_threshold: float = 0.7  # a candidate pair is a near duplicate when estimated Jaccard >= this
    max_bucket_docs: int = 8  # kept documents remembered per LSH bucket (bounds the driver pass to O(n))
    seed: int = 0  # MinHash permutations
    # Ray Data
    batch_size: int = 1024  # documents per block and per map_batches call (~0.3 s of work: amortises task overhead)

    def __post_init__(self) -> None:
        # YAML gives a list; a frozen dataclass should hold a hashable, lower-cased tuple.
        object.__setattr__(self, "toxic_lexicon", tuple(sorted({w.lower() for w in self.toxic_lexicon})))
        if self.num_perm % self.lsh_bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of lsh_bands ({self.lsh_bands})")
        if not 0 < self.near_dup_threshold <= 1:
            raise ValueError(f"near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}")
        for name in ("min_words", "shingle_size", "top_ngram_n", "dup_ngram_n", "batch_size", "max_bucket_docs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict | None) -> FilterConfig:
        return config_from_dict(cls, d, "filter")

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


# ------------------------------------------------------------------------------------------------------------ PII
def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a digit string (every card number passes; ~10% of random digit strings do)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return len(digits) > 1 and total % 10 == 0


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"  # 0-255 without leading zeros ("01.02.03.04" is not an IP)
# Applied in this order; each replaces its match with a placeholder that contains no digit, so later patterns
# cannot re-match it. Cards go before phones and ids so a 4-4-4-4 group is never split into a phone.
_PII_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("email", re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")),
    ("card", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")),
    ("id_number", re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])")),  # SSN-like 3-2-4
    ("phone", re.compile(r"(?<![\w+(])(?:\+\d{1,2}[ .-]?)?(?:\(\d{3}\)[ ]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\d-])")),
    # A dotted quad is syntactically a valid IP; "v1.2.3.4" / "version 1.2.3.4" are read as versions and kept,
    # a bare one is scrubbed (privacy over precision). Five or more parts ("1.2.3.4.5") are not an IP.
    ("ip", re.compile(rf"(?<![\w.])(?<!version )(?<!Version )(?:{_OCTET}\.){{3}}{_OCTET}(?!\.?\d)")),
)


def scrub_pii(text: str, luhn_check: bool = True) -> tuple[str, list[str]]:
    """Replace PII by typed placeholders; returns (scrubbed text, kinds found in PII_KINDS order, no repeats)."""
    found: set[str] = set()
    for kind, pattern in _PII_PATTERNS:
        def repl(m: re.Match, kind=kind) -> str:
            if kind == "card" and luhn_check and not luhn_valid(re.sub(r"\D", "", m.group())):
                return m.group()
            found.add(kind)
            return PLACEHOLDER[kind]
        text = pattern.sub(repl, text)
    return text, [k for k in PII_KINDS if k in found]


# -------------------------------------------------------------------------------------------------------- quality
# Function words of a few European languages: Gopher requires >= 2 English stop words because it runs after language
# ID; we run quality first, so the list is multilingual and only "no natural language at all" fails it.
EN_STOP = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been being it its
this that these those i you he she we they me him her us them my your his our their not no do does did have has had
will would can could should there here what which who when where why how all any some so than then too very just
about into over after before up down out also more most other such only own same few each both""".split())
_FOREIGN_STOP = frozenset("""el la los las un una y o de del en es son que por para con se su lo al no como pero más
der die das ein eine und oder ist sind nicht mit von zu im am auf für ich du er sie wir ihr es den dem des auch wie
le les une et ou est sont pas avec dans pour sur je tu il elle nous vous ils du au ce qui ne se
il lo gli uno ed di che per non sono con da nel della il
o os um uma e ou não com do da em que para
de het een en van ik je niet op met is zijn""".split())
FUNCTION_WORDS = EN_STOP | _FOREIGN_STOP

_ALPHA_WORD = re.compile(r"[^\W\d_]+")  # runs of letters, any script
_HAS_ALNUM = re.compile(r"[^\W_]")


def _alpha_words(text: str) -> list[str]:
    return _ALPHA_WORD.findall(text.lower())


def _top_ngram_frac(words: list[str], n: int, total_chars: int) -> float:
    """Gopher: characters covered by the most frequent n-gram's occurrences / all word characters."""
    if len(words) < n or total_chars == 0:
        return 0.0
    ngram, count = Counter(zip(*(words[i:] for i in range(n)))).most_common(1)[0]
    # Overlapping occurrences ("ok ok ok") can cover more than all characters: clamp to 1.
    return min(1.0, count * sum(map(len, ngram)) / total_chars) if count > 1 else 0.0


def _dup_ngram_frac(words: list[str], n: int, total_chars: int) -> float:
    """Gopher: characters of the words inside any n-gram that occurs more than once / all word characters."""
    if len(words) < n or total_chars == 0:
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    covered = bytearray(len(words))
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


def quality_reason(text: str, cfg: FilterConfig) -> str | None:
    """The first quality check (QUALITY_REASONS, in order) that the text fails, else None."""
    words = text.split()
    if not cfg.min_words <= len(words) <= cfg.max_words:
        return "length"
    if sum(1 for w in words if not _HAS_ALNUM.search(w)) / len(words) > cfg.max_symbol_ratio:
        return "symbols"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and (len(lines) - len(set(lines))) / len(lines) > cfg.max_dup_line_frac:
        return "repetition"
    lowered = [w.lower() for w in words]
    total_chars = sum(map(len, lowered))
    if (_top_ngram_frac(lowered, cfg.top_ngram_n, total_chars) > cfg.max_top_ngram_frac
            or _dup_ngram_frac(lowered, cfg.dup_ngram_n, total_chars) > cfg.max_dup_ngram_frac):
        return "repetition"
    alpha = _alpha_words(text)
    if (len(alpha) >= cfg.min_alpha_words
            and sum(1 for w in alpha if w in FUNCTION_WORDS) / len(alpha) < cfg.min_function_word_ratio):
        return "function_words"
    return None


# ------------------------------------------------------------------------------------------ language and toxicity
def english_ratio(text: str) -> tuple[float, int]:
    """(English stop words / alphabetic words, number of alphabetic words)."""
    words = _alpha_words(text)
    return (sum(1 for w in words if w in EN_STOP) / len(words) if words else 0.0), len(words)


def is_non_english(text: str, cfg: FilterConfig) -> bool:
    ratio, n_words = english_ratio(text)
    return n_words >= cfg.min_alpha_words and ratio < cfg.min_english_ratio


def toxicity_score(text: str, lexicon: frozenset[str] | tuple[str, ...]) -> float:
    """Fraction of the (lower-cased, alphabetic) words that are in the lexicon."""
    words = _alpha_words(text)
    return sum(1 for w in words if w in lexicon) / len(words) if words else 0.0


# ---------------------------------------------------------------------------------------------- the Ray pipeline
def _process_batch(batch: pa.Table, cfg: FilterConfig) -> pa.Table:
    """Per-document rules on one Arrow batch of (doc_id, text): scrubbed text, the first removing rule, PII kinds
    found, and the dedup keys (exact hash, MinHash signature)."""
    lexicon = frozenset(cfg.toxic_lexicon)
    texts, removed_by, reasons, kinds_found, hashes, word_lists = [], [], [], [], [], []
    for text in batch.column("text").to_pylist():
        text, kinds = scrub_pii(text or "", cfg.luhn_check)
        reason = quality_reason(text, cfg)
        if reason:
            rule = "quality"
        elif is_non_english(text, cfg):
            rule = "language"
        elif toxicity_score(text, lexicon) > cfg.max_toxic_fraction:
            rule = "toxicity"
        else:
            rule = None
        texts.append(text)
        removed_by.append(rule)
        reasons.append(reason)
        kinds_found.append(kinds)
        words = normalize(text)
        hashes.append(hash_normalized(words))
        word_lists.append(words.split())
    signatures = minhash_words(word_lists, cfg.num_perm, cfg.shingle_size, cfg.seed)  # (n, num_perm) uint32
    return pa.table({
        "doc_id": batch.column("doc_id").cast(pa.string()),
        "text": pa.array(texts, pa.string()),
        "removed_by": pa.array(removed_by, pa.string()),
        "quality_reason": pa.array(reasons, pa.string()),
        "pii_found": pa.array(kinds_found, pa.list_(pa.string())),
        "exact_hash": pa.array(hashes, pa.int64()),
        "minhash": pa.FixedSizeListArray.from_arrays(pa.array(signatures.reshape(-1), pa.uint32()), cfg.num_perm),
    })


def _keep_rows(batch: pa.Table, keep_ids: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("doc_id"), value_set=keep_ids)).select(["doc_id", "text"])


def _dedup(meta: pa.Table, cfg: FilterConfig) -> list[str | None]:
    """The global steps on the driver: the final `removed_by` of every row of meta.

    meta holds only (doc_id, removed_by, exact_hash, minhash) - ~0.6 kB a document, so the driver pass is fine at
    the tiny and ci scales (20k documents ~ 12 MB); it is O(n) (dict lookups; LSH buckets are capped). At web scale
    the same logic would run as a Ray Data groupby on the hash and on each band key.
    """
    removed = meta.column("removed_by").to_pylist()
    order = np.asarray(pc.sort_indices(meta, [("doc_id", "ascending")]))  # "first occurrence" = lowest doc_id
    alive = order[[removed[i] is None for i in order]]
    hashes = meta.column("exact_hash").to_numpy()
    for j in exact_duplicates(hashes[alive].tolist()):
        removed[alive[j]] = "exact_dup"
    alive = np.asarray([i for i in alive if removed[i] is None], dtype=np.int64)
    if len(alive):
        flat = meta.column("minhash").combine_chunks().flatten().to_numpy()
        signatures = flat.reshape(-1, cfg.num_perm)[alive]
        for j in near_duplicates(signatures, cfg.lsh_bands, cfg.near_dup_threshold, cfg.max_bucket_docs):
            removed[alive[j]] = "near_dup"
    return removed


def _part_names():
    """Deterministic file names (part-00000-0.parquet, ...): Ray's default names carry a random write id, which
    would change the output's DVC hash on every run."""
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}"

    return PartNames(file_format="parquet")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished tmp dir into place: out is either the old or the new version, never half of one."""
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def run_filter(input_paths: list[str], output_dir: str, cfg: FilterConfig) -> dict:
    """Filter Parquet documents (doc_id, text[, planted, pii_kinds]) into output_dir (Parquet: doc_id, text).

    output_dir is replaced as a whole and atomically (written beside it, then renamed); it must be a local path.
    Needs Ray initialised (or starts a default local one). Returns the report (see `_report`).
    """
    import ray
    from ray.data import SaveMode

    t0 = time.perf_counter()
    if isinstance(input_paths, str):
        input_paths = [input_paths]
    if not input_paths:
        raise ValueError("run_filter: no input paths given")
    if "://" in str(output_dir):
        raise ValueError(f"run_filter: output_dir must be a local path (atomic rename), got {output_dir!r}")
    # preserve_order (captured by the dataset's own context copy, so the global context is restored at once): the
    # clean corpus keeps the input order and its files are byte-for-byte reproducible, so DVC sees no change.
    ctx = ray.data.DataContext.get_current()
    saved, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        ds = ray.data.read_parquet(list(input_paths))
    finally:
        ctx.execution_options.preserve_order = saved
    names = set(ds.schema().names)
    missing = sorted({"doc_id", "text"} - names)
    if missing:
        raise ValueError(f"run_filter: input {input_paths} lacks column(s) {missing}; found {sorted(names)}")
    # Only doc_id and text enter the pipeline: the rules cannot read the planted labels. A single file reads as
    # one block: split it (streaming, no barrier) so that map tasks run in parallel.
    docs = ds.select_columns(["doc_id", "text"]).repartition(target_num_rows_per_block=cfg.batch_size)
    processed = docs.map_batches(_process_batch, batch_format="pyarrow", batch_size=cfg.batch_size,
                                 fn_kwargs={"cfg": cfg}).materialize()
    tables = ray.get(processed.drop_columns(["text"]).to_arrow_refs())
    n_in = sum(t.num_rows for t in tables)
    if n_in == 0:
        raise ValueError(f"run_filter: input {input_paths} holds no documents")
    meta = pa.concat_tables(tables)
    if pc.count_distinct(meta.column("doc_id")).as_py() != n_in:
        raise ValueError("run_filter: doc_id must be unique (first-occurrence dedup is defined by doc_id order)")
    removed = _dedup(meta, cfg)
    keep_ids = pa.array([d for d, r in zip(meta.column("doc_id").to_pylist(), removed) if r is None], pa.string())

    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):  # left by a killed run
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        kept = processed.map_batches(_keep_rows, batch_format="pyarrow", fn_kwargs={"keep_ids": keep_ids})
        # OVERWRITE: tmp is fresh, and APPEND would insist on the random write id in every file name.
        kept.write_parquet(str(tmp), filename_provider=_part_names(), mode=SaveMode.OVERWRITE)
        tmp.mkdir(exist_ok=True)  # an empty result still yields a (empty) corpus folder
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    labels = None
    if "planted" in names:  # read only now, for scoring
        label_cols = ["doc_id", "planted"] + (["pii_kinds"] if "pii_kinds" in names else [])
        source = input_paths[0] if len(input_paths) == 1 else list(input_paths)  # a lone path may be a folder
        labels = pad.dataset(source, format="parquet").to_table(columns=label_cols)
    report = _report(meta, removed, labels)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


# ---------------------------------------------------------------------------------------------------- the report
def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


METRIC_DEFINITIONS = (
    "precision/recall per rule against the planted labels (RULE_LABEL). Removal rules: predicted = the documents "
    "attributed to the rule (first rule in rule_order that removes them), so a labelled document removed by an "
    "earlier rule counts against the later rule's recall. Dedup: exact_dup and near_dup labels are both true "
    "duplicates, so a removal by either dedup rule of a document labelled exact_dup or near_dup is a true positive "
    "for that rule's precision, and recall[exact_dup] / recall[near_dup] count the documents with that label removed "
    "by either dedup rule. pii: the scrubber removes nothing and runs on every document, so predicted = documents "
    "where it found any PII, over all input documents; pii_kind_* do the same per kind against pii_kinds. "
    "null = undefined (nothing predicted, or no such label). Documents without a label (planted null: real sources) "
    "go through every rule but are left out of all of these; `unlabelled` counts them (in, out, removed per rule) "
    "and the confusion matrix shows them in its `unlabelled` column.")


def _report(meta: pa.Table, removed: list[str | None], labels: pa.Table | None) -> dict:
    n_in = meta.num_rows
    pii_found = meta.column("pii_found").to_pylist()
    reasons = meta.column("quality_reason").to_pylist()
    report = {
        "documents_in": n_in,
        "documents_out": sum(r is None for r in removed),
        "rule_order": list(RULE_ORDER),
        "attribution": "each removed document is counted once, under the first rule of rule_order that removes it; "
                       "PII scrubbing rewrites text and never removes a document",
        "removed": {rule: removed.count(rule) for rule in RULE_ORDER},
        "quality_reasons": {q: reasons.count(q) for q in QUALITY_REASONS},  # sub-check that removed each
        # PII counts are over all input documents (scrubbing runs first, on every document, removed or not).
        "pii_docs_scrubbed": sum(1 for k in pii_found if k),
        "pii_scrubbed": {kind: sum(1 for k in pii_found if kind in k) for kind in PII_KINDS},
        "labels_present": labels is not None,
    }
    if labels is None:
        return report
    by_id = dict(zip(labels.column("doc_id").cast(pa.string()).to_pylist(), range(labels.num_rows)))
    idx = [by_id[d] for d in meta.column("doc_id").to_pylist()]  # labels aligned with meta's rows
    planted_all = labels.column("planted").to_pylist()
    planted = [planted_all[i] for i in idx]
    # Confusion over every document: rows = the rule that removed it ("kept" if none), columns = its label.
    confusion: dict[str, Counter] = {}
    for r, p in zip(removed, planted):
        confusion.setdefault(r or "kept", Counter())[UNLABELLED if p is None else p] += 1
    unlabelled = [i for i, p in enumerate(planted) if p is None]
    if unlabelled:
        report["unlabelled"] = {"documents_in": len(unlabelled),
                                "documents_out": sum(removed[i] is None for i in unlabelled),
                                "removed": {rule: sum(removed[i] == rule for i in unlabelled) for rule in RULE_ORDER}}
    labelled = [i for i, p in enumerate(planted) if p is not None]
    if not labelled:
        report["labels_present"] = False
        return report
    # Scores on the labelled documents only.
    idx, planted = [idx[i] for i in labelled], [planted[i] for i in labelled]
    removed, pii_found = [removed[i] for i in labelled], [pii_found[i] for i in labelled]
    kinds_true = None
    if "pii_kinds" in labels.column_names:
        kinds_all = labels.column("pii_kinds").to_pylist()
        kinds_true = [kinds_all[i] or [] for i in idx]

    precision, recall = {}, {}
    flagged = [bool(k) for k in pii_found]
    positive = [p == "pii" for p in planted]
    tp = sum(f and p for f, p in zip(flagged, positive))
    precision["pii"], recall["pii"] = _ratio(tp, sum(flagged)), _ratio(tp, sum(positive))
    for rule in ("quality", "language", "toxicity"):
        label = RULE_LABEL[rule]
        tp = sum(r == rule and p == label for r, p in zip(removed, planted))
        precision[rule], recall[rule] = _ratio(tp, removed.count(rule)), _ratio(tp, planted.count(label))
    dedup_rules = ("exact_dup", "near_dup")
    for rule in dedup_rules:
        tp_prec = sum(r == rule and p in DEDUP_LABELS for r, p in zip(removed, planted))
        tp_rec = sum(r in dedup_rules and p == rule for r, p in zip(removed, planted))
        precision[rule], recall[rule] = _ratio(tp_prec, removed.count(rule)), _ratio(tp_rec, planted.count(rule))
    report.update(precision=precision, recall=recall, metric_definitions=METRIC_DEFINITIONS,
                  planted=dict(sorted(Counter(planted).items())))
    report["confusion"] = {r: dict(sorted(c.items())) for r, c in sorted(confusion.items())}
    if kinds_true is not None:
        report["pii_kind_precision"], report["pii_kind_recall"] = {}, {}
        for kind in PII_KINDS:
            f = [kind in k for k in pii_found]
            t = [kind in k for k in kinds_true]
            tp = sum(a and b for a, b in zip(f, t))
            report["pii_kind_precision"][kind], report["pii_kind_recall"][kind] = _ratio(tp, sum(f)), _ratio(tp, sum(t))
    return report
