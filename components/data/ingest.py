"""The `data` stage's work: the synthetic world and real sources (params `data`) -> the world's tables in Parquet.

params `data`:
  world      WorldConfig overrides (components/data/world.py)
  synthetic  true (default): every world table is generated and real rows are added to it; false: no world table,
             so every table a later stage reads must come from a source; or a list of world tables to keep (e.g.
             [gatt, eval_prompts, eval_gatt]: real pretraining/SFT/preference/RL data, the world's GAtt dialogs
             and held-out evaluation, which only the oracle can score). A table that is neither kept nor fed by a
             source is an error naming it and the stages that read it.
  sources    a list of {format, path | hf, table, ...} (Source below), read in order.

Locations. `path`: a file, folder (every non-hidden file under it) or glob, local or any fsspec URL (s3://, gs://,
memory://, ... when that filesystem's package is installed). The container comes from the extension, optionally
compressed (.gz, .bz2, .xz, .zst, ...): .txt (format text only), .jsonl/.ndjson, .json (an array of objects, or
JSON lines), .parquet, .csv, .tsv. `hf`: a Hugging Face dataset name (needs the `datasets` package and a network).

FORMATS (how a record becomes rows) and the tables each may feed (the first is the default):
  text      pretrain                      a .txt file is one document (`paragraphs: true`: one per blank-line-
                                          separated paragraph); other containers: the `column` field (default text)
  alpaca    sft | rl_prompts              instruction (+ "\\n\\n" + input when not empty) -> user, output -> assistant
  messages  sft | rl_prompts              OpenAI `messages` [{role, content}] or ShareGPT `conversations` [{from,
                                          value}] (human/user, gpt/assistant/chatgpt/bing/bard/model, system); for
                                          rl_prompts a final assistant turn is dropped
  prefs     prefs_helpful | prefs_safety  (no default) prompt, chosen, rejected; each a string or a message list
                                          (TRL style: chosen/rejected may be whole conversations whose shared
                                          prefix is the prompt); optional `rating` (null or one of RATINGS);
                                          or LLaMA-Factory's ShareGPT layout: `conversations` (+ `system`) the
                                          prompt, chosen/rejected each one {from, value} message
  hh_rlhf   prefs_helpful | prefs_safety  (no default) Anthropic HH-RLHF: chosen/rejected transcripts
                                          "\\n\\nHuman: ... \\n\\nAssistant: ..." sharing everything but the last answer
  harmful   rl_prompts                    the `column` field (default prompt) -> a user prompt with is_safety true

Real rows have exactly the world's schemas (SCHEMAS, components/data/tables.py) and say that they carry no ground truth:
  pretrain  doc_id "src<source #>-<row #>" (sorts after the world's "doc-..." ids, so dedup keeps a world document
            over a real copy of it), planted null and pii_kinds null = "not labelled" (the filter scores its rules
            on labelled documents only and counts the unlabelled ones apart)
  others    task REAL_TASK ("real": not an oracle task, so oracle.score() refuses it loudly instead of scoring it),
            reference "{}", rating null unless the source gives one, is_safety true only for `harmful` sources.
When a table gets real rows, its rows (world + real) are shuffled with a seeded permutation (world seed), since
stages take prefixes (the RM's validation pairs, `rejection.sample.prompts`); pretrain keeps its order (the filter
orders by doc_id). With no sources the output is exactly the synthetic world's.

Every source is checked and read before anything is written (keys, format, table, files matched, columns, every
row, with file and line); `skip_invalid: true` skips rows that do not fit the format (counted in the metrics)
instead of stopping. The whole output folder is replaced atomically.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from components.common import config_from_dict
from components.data.oracle import RATINGS
from components.data.tables import SCHEMAS, generate_world
from components.data.world import WorldConfig

__all__ = ["DataConfig", "Source", "IngestError", "Ingested", "FORMATS", "REAL_TASK", "READERS", "build_data",
           "write_data", "run_data", "lineage_params"]

REAL_TASK = "real"
FORMATS = {  # format -> tables it may feed, the default first (None: `table` is required)
    "text": ("pretrain",),
    "alpaca": ("sft", "rl_prompts"),
    "messages": ("sft", "rl_prompts"),
    "prefs": (None, "prefs_helpful", "prefs_safety"),
    "hh_rlhf": (None, "prefs_helpful", "prefs_safety"),
    "harmful": ("rl_prompts",),
}
DEFAULT_COLUMN = {"text": "text", "harmful": "prompt"}  # formats whose field is configurable (`column`)
FORMAT_KEYS = {"text": {"paragraphs", "column"}, "harmful": {"column"}, "messages": {"column"}}  # format-only keys
# Which stages read each table: named when a table is missing.
READERS = {"pretrain": "filter", "sft": "sft (and replay in rejection, gatt, distill)", "prefs_helpful": "rm_helpful",
           "prefs_safety": "rm_safety", "rl_prompts": "rejection, ppo, distill", "gatt": "gatt",
           "eval_prompts": "evaluate", "eval_gatt": "evaluate"}
assert set(READERS) == set(SCHEMAS)
CONTAINERS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
              ".csv": "csv", ".tsv": "tsv"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}


class IngestError(ValueError):
    """A source that cannot be ingested as configured (the message names the source, and the file and line)."""


class _RowError(ValueError):
    """One record that does not fit the source's format (skipped when skip_invalid)."""


# --------------------------------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class Source:
    """One entry of data.sources."""

    format: str  # one of FORMATS
    path: str | None = None  # file, folder or glob; local or an fsspec URL
    hf: str | None = None  # or a Hugging Face dataset name (needs `datasets` and a network)
    table: str | None = None  # the table fed; default per format (FORMATS)
    column: str | None = None  # text: the text field (default text); harmful: the prompt field (default prompt);
    #                            messages: the message-list field (default messages, else conversations)
    paragraphs: bool = False  # text: one document per blank-line-separated paragraph
    split: str | None = None  # hf: the split (default train)
    subset: str | None = None  # hf: the configuration name
    data_dir: str | None = None  # hf: a folder of the dataset repo (Anthropic/hh-rlhf: harmless-base, helpful-base)
    limit: int | None = None  # keep only the first `limit` rows
    skip_invalid: bool = False  # skip records that do not fit the format (counted) instead of stopping

    @property
    def location(self) -> str:
        return f"hf:{self.hf}" if self.hf else str(self.path)


_KEY_TYPES = {"format": str, "path": str, "hf": str, "table": str, "column": str, "paragraphs": bool, "split": str,
              "subset": str, "data_dir": str, "limit": int, "skip_invalid": bool}


def _parse_source(i: int, entry) -> Source:
    where = f"data.sources[{i}]"
    if not isinstance(entry, dict):
        raise IngestError(f"{where} must be a mapping such as {{path: corpus/*.txt, format: text}}, got {entry!r}")
    if "format" not in entry:
        raise IngestError(f"{where}: `format` is required; one of {sorted(FORMATS)}")
    try:
        src = config_from_dict(Source, entry, where)
    except ValueError as e:  # unknown keys
        raise IngestError(str(e)) from None
    for name, kind in _KEY_TYPES.items():
        value = getattr(src, name)
        if value is not None and (type(value) is not kind):  # type(): True is not a valid `limit`
            raise IngestError(f"{where}: {name} must be {kind.__name__}, got {value!r}")
    where = f"{where} ({src.location})"
    if src.format not in FORMATS:
        raise IngestError(f"{where}: unknown format {src.format!r}; choose one of {sorted(FORMATS)}")
    if (src.path is None) == (src.hf is None):
        raise IngestError(f"{where}: give exactly one of path (file, folder, glob or URL) and hf (dataset name)")
    tables = FORMATS[src.format]
    table = src.table or tables[0]
    if table is None:
        raise IngestError(f"{where}: format {src.format!r} needs `table`: one of {list(tables[1:])}")
    if table not in tables:
        allowed = [t for t in tables if t]
        hint = "" if table in SCHEMAS else f" (tables: {sorted(SCHEMAS)})"
        raise IngestError(f"{where}: format {src.format!r} cannot feed table {table!r}; it feeds {allowed}{hint}")
    given = {k for k, v in entry.items() if v not in (None, False)}
    misplaced = sorted(given & ({"paragraphs", "column"} - FORMAT_KEYS.get(src.format, set())))
    if misplaced:
        raise IngestError(f"{where}: {misplaced} do not apply to format {src.format!r}")
    if src.path and given & {"split", "subset", "data_dir"}:
        raise IngestError(f"{where}: {sorted(given & {'split', 'subset', 'data_dir'})} apply to hf sources only")
    if src.limit is not None and src.limit < 1:
        raise IngestError(f"{where}: limit must be a positive integer, got {src.limit!r}")
    return Source(**{**asdict(src), "table": table})


@dataclass(frozen=True)
class DataConfig:
    """params `data`, checked: the world, the world tables kept, and the sources."""

    world: WorldConfig
    synthetic: tuple[str, ...]
    sources: tuple[Source, ...]

    @classmethod
    def from_dict(cls, d: dict | None) -> DataConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - {"world", "synthetic", "sources"})
        if unknown:
            raise IngestError(f"unknown keys {unknown} in params section 'data'; known keys: "
                              "['sources', 'synthetic', 'world']")
        synthetic = d.get("synthetic", True)
        if synthetic is True:
            kept = tuple(SCHEMAS)
        elif synthetic is False:
            kept = ()
        elif isinstance(synthetic, list) and all(isinstance(t, str) for t in synthetic):
            bad = sorted(set(synthetic) - set(SCHEMAS))
            if bad:
                raise IngestError(f"data.synthetic: unknown tables {bad}; tables: {sorted(SCHEMAS)}")
            kept = tuple(t for t in SCHEMAS if t in synthetic)
        else:
            raise IngestError(f"data.synthetic must be true, false or a list of tables, got {synthetic!r}")
        sources = d.get("sources") or []
        if not isinstance(sources, list):
            raise IngestError(f"data.sources must be a list, got {type(sources).__name__}")
        parsed = tuple(_parse_source(i, s) for i, s in enumerate(sources))
        fed = set(kept) | {s.table for s in parsed}
        missing = [t for t in SCHEMAS if t not in fed]
        if missing:
            raise IngestError("no data for tables " + ", ".join(f"{t} (read by {READERS[t]})" for t in missing)
                              + ": add sources for them or keep them synthetic (data.synthetic: true or a list)")
        try:
            world = WorldConfig.from_dict(d.get("world") or {})
        except (TypeError, ValueError) as e:
            raise IngestError(str(e)) from None
        return cls(world, kept, parsed)


# ------------------------------------------------------------------------------------------- finding the files
def _resolve(i: int, src: Source) -> list[tuple[object, str, str]]:
    """(filesystem, path, container) of every file of a path source, sorted; errors when none or unknown."""
    from fsspec.core import url_to_fs

    where = f"data.sources[{i}] ({src.location})"
    try:
        fs, root = url_to_fs(src.path)
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs
        raise IngestError(f"{where}: cannot open this location: {e}") from None
    given = set(root.split("/"))

    def visible(p: str) -> bool:  # hidden names (.gitignore, .DS_Store, ...) only when named in the path itself
        return not any(part.startswith(".") and part not in given for part in p.split("/"))

    if any(c in root for c in "*?["):
        paths = [p for p in fs.glob(root) if visible(p) and fs.isfile(p)]
        if not paths:
            raise IngestError(f"{where}: no files matched the glob")
    elif fs.isdir(root):
        paths = [p for p in fs.find(root) if visible(p)]
        if not paths:
            raise IngestError(f"{where}: the folder holds no files")
    elif fs.isfile(root):
        paths = [root]
    else:
        raise IngestError(f"{where}: no such file or folder")
    files = []
    for p in sorted(paths):
        container = _container(p)
        if container is None:
            raise IngestError(f"{where}: cannot tell the container of {fs.unstrip_protocol(p)} from its extension; "
                              f"known: {sorted(CONTAINERS)} (optionally compressed, e.g. .jsonl.gz)")
        if container == "txt" and src.format != "text":
            raise IngestError(f"{where}: format {src.format!r} reads records, not plain text "
                              f"({fs.unstrip_protocol(p)})")
        files.append((fs, p, container))
    return files


def _container(path: str) -> str | None:
    from fsspec.utils import infer_compression

    name = path.rsplit("/", 1)[-1].lower()
    if infer_compression(name):
        name = name.rsplit(".", 1)[0]
    return CONTAINERS.get("." + name.rsplit(".", 1)[-1]) if "." in name else None


def _check_hf(i: int, src: Source) -> None:
    where = f"data.sources[{i}] ({src.location})"
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise IngestError(f"{where}: Hugging Face datasets by name need the `datasets` package, which is not "
                          "installed (pip install datasets); or download the files and give them as `path`") from None
    if not _online():
        raise IngestError(f"{where}: Hugging Face datasets by name need a network, and this machine is offline "
                          "(or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); download the files and give them as "
                          "`path`")


def _online() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


# -------------------------------------------------------------------------------------------- reading records
def _records(fs, path: str, container: str, columns: tuple[str, ...], digest) -> list[tuple[str, object]]:
    """(where, record) of one file: record is a dict, or the whole text of a .txt file. `columns` must exist in
    containers with a header (Parquet, CSV); JSON records are checked one by one."""
    url = fs.unstrip_protocol(path)
    with fs.open(path, "rb", compression="infer") as f:
        data = f.read()
    digest.update(path.rsplit("/", 1)[-1].encode() + b"\0" + data)  # content, not where the repo lives
    if container == "parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
            raise IngestError(f"{url}: not a readable Parquet file: {e}") from None
        _need(url, columns, table.column_names)
        return [(f"{url}: row {n}", row) for n, row in enumerate(table.to_pylist())]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise IngestError(f"{url}: not UTF-8 text: {e}") from None
    if container == "txt":
        return [(url, text)]
    if container in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="," if container == "csv" else "\t")
        _need(url, columns, reader.fieldnames or [])
        return [(f"{url}:{reader.line_num}", row) for row in reader]
    if container == "json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise IngestError(f"{url}:{e.lineno}: malformed JSON: {e.msg}") from None
        return [(f"{url}: item {n}", item) for n, item in enumerate(items)]
    out = []  # JSON lines (also accepted in .json files that do not hold an array)
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{url}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise IngestError(f"{url}:{n}: malformed JSON line: {e.msg}") from None
    return out


def _need(url: str, columns: tuple[str, ...], have: list[str]) -> None:
    missing = [c for c in columns if c not in have]
    if missing:
        raise IngestError(f"{url}: missing column(s) {missing}; columns: {list(have)}")


def _hf_records(src: Source, columns: tuple[str, ...], digest) -> list[tuple[str, object]]:
    import datasets

    ds = datasets.load_dataset(src.hf, src.subset, split=src.split or "train", data_dir=src.data_dir)
    url = f"hf:{src.hf}[{src.split or 'train'}]"
    _need(url, columns, ds.column_names)
    digest.update(f"{url}\0{getattr(ds, '_fingerprint', '')}".encode())
    return [(f"{url}: row {n}", row) for n, row in enumerate(ds)]


def _header_columns(src: Source) -> tuple[str, ...]:
    """The fields a headed container (Parquet, CSV, a HF dataset) must have for this source."""
    if src.format in DEFAULT_COLUMN:
        return (src.column or DEFAULT_COLUMN[src.format],)
    if src.format == "messages":
        return (src.column,) if src.column else ()  # else either messages or conversations, checked per record
    return {"alpaca": ("instruction", "output"), "prefs": ("chosen", "rejected"),
            "hh_rlhf": ("chosen", "rejected")}[src.format]


# ------------------------------------------------------------------------------------------------ the formats
def _field(record, key: str, kinds=(str,)):
    if not isinstance(record, dict):
        raise _RowError(f"expected an object, got {type(record).__name__}")
    if key not in record:
        raise _RowError(f"no {key!r} field (fields: {sorted(record)})")
    value = record[key]
    if not isinstance(value, kinds):
        raise _RowError(f"{key!r} must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    return value


def _nonempty(text: str, what: str) -> str:
    if not text.strip():
        raise _RowError(f"empty {what}")
    return text


def _dialog(messages, ends_with: str | None) -> list[dict]:
    """Check a conversation fits the Llama 2 chat format (model/chat.py): optional system, then user/assistant
    alternating from a user turn, ending with `ends_with` (None: either)."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise _RowError("the message list is a string that is not JSON") from None
    if not isinstance(messages, list) or not messages:
        raise _RowError("expected a non-empty list of messages")
    dialog = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _RowError(f"message {n} is not an object")
        role, content = (m.get("role"), m.get("content")) if "role" in m else (m.get("from"), m.get("value"))
        role = SHAREGPT_ROLES.get(str(role).lower()) if role is not None else None
        if role is None or not isinstance(content, str):
            raise _RowError(f"message {n} must have role/content (or from/value) with a known role "
                            f"({sorted(SHAREGPT_ROLES)}) and text content, got {m!r}"[:300])
        dialog.append({"role": role, "content": content})
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    for n, m in enumerate(turns):
        if m["role"] != ("user" if n % 2 == 0 else "assistant"):
            raise _RowError(f"roles out of order at turn {n} ({m['role']}): after an optional system prompt, user "
                            "and assistant must alternate from a user turn")
    if not turns or ends_with and turns[-1]["role"] != ends_with:
        raise _RowError(f"the conversation must end with a{'n' if ends_with == 'assistant' else ''} {ends_with} turn")
    return dialog


def _answer(value, side: str) -> tuple[str, list[dict] | None]:
    """A preference side: a plain answer, one message (LLaMA-Factory's ShareGPT layout: {"from": "gpt", "value"}),
    or a conversation ending with the answer -> (answer, its prefix)."""
    if isinstance(value, str):
        return _nonempty(value, side), None
    if isinstance(value, dict):
        value = [value]
    alone = len(value) == 1  # TRL's explicit-prompt style: [{assistant message}], the prompt given apart
    dialog = _dialog([{"role": "user", "content": ""}] + value if alone else value, "assistant")
    return _nonempty(dialog[-1]["content"], side), None if alone else dialog[:-1]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def _hh_dialog(text: str, side: str) -> list[dict]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise _RowError(f"{side} does not start with '\\n\\nHuman: '")
    return _dialog([{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
                    for who, body in zip(parts[1::2], parts[2::2])], "assistant")


def _rows(src: Source, record) -> list[dict]:
    """The table rows (without pretrain's doc_id) of one record; _RowError when it does not fit."""
    fmt, table = src.format, src.table
    if fmt == "text":
        text = record if isinstance(record, str) else _field(record, src.column or "text")
        docs = [p.strip() for p in re.split(r"\n[ \t]*\n", text)] if src.paragraphs else [text]
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise _RowError("empty document")
        return [{"text": d, "planted": None, "pii_kinds": None} for d in docs]
    if fmt == "harmful":
        prompt = _nonempty(_field(record, src.column or "prompt"), "prompt").strip()
        return [{"prompt": json.dumps([{"role": "user", "content": prompt}]), "task": REAL_TASK, "is_safety": True,
                 "reference": "{}"}]
    if fmt in ("alpaca", "messages"):
        if fmt == "alpaca":
            user = _nonempty(_field(record, "instruction"), "instruction").strip()
            extra = record.get("input") or ""
            if not isinstance(extra, str):
                raise _RowError(f"'input' must be a string, got {type(extra).__name__}")
            user += f"\n\n{extra.strip()}" if extra.strip() else ""
            dialog = [{"role": "user", "content": user},
                      {"role": "assistant", "content": _nonempty(_field(record, "output"), "output")}]
        else:
            key = src.column or ("messages" if isinstance(record, dict) and "messages" in record else "conversations")
            dialog = _dialog(_field(record, key, (list, str)), "assistant" if table == "sft" else None)
        if table == "sft":
            return [{"messages": json.dumps(dialog), "task": REAL_TASK}]
        prompt = _dialog(dialog[:-1] if dialog[-1]["role"] == "assistant" else dialog, "user")
        return [{"prompt": json.dumps(prompt), "task": REAL_TASK, "is_safety": False, "reference": "{}"}]
    # preference pairs
    if fmt == "hh_rlhf":
        chosen = _hh_dialog(_field(record, "chosen"), "chosen")
        rejected = _hh_dialog(_field(record, "rejected"), "rejected")
        if chosen[:-1] != rejected[:-1]:
            raise _RowError("chosen and rejected differ before their final answers")
        prompt, answers, rating = chosen[:-1], (chosen[-1]["content"], rejected[-1]["content"]), None
        if not prompt:
            raise _RowError("no Human turn before the final answer")
        for side, answer in zip(("chosen", "rejected"), answers):
            _nonempty(answer, f"{side} answer")
    else:
        (chosen, c_prefix), (rejected, r_prefix) = (_answer(_field(record, k, (str, list, dict)), k)
                                                    for k in ("chosen", "rejected"))
        given = record.get("prompt")
        if given is None and "conversations" in record:  # LLaMA-Factory's ShareGPT preference layout
            given = _field(record, "conversations", (list, str))
            if record.get("system"):
                given = [{"role": "system", "content": _field(record, "system")}] + _dialog(given, "user")
        if isinstance(given, str):
            given = [{"role": "user", "content": _nonempty(given, "prompt")}]
        elif given is not None:
            given = _dialog(given, "user")
        candidates = [p for p in (given, c_prefix, r_prefix) if p]
        if not candidates:
            raise _RowError("no prompt: give a 'prompt' field, or chosen/rejected as conversations")
        if any(p != candidates[0] for p in candidates):
            raise _RowError("the prompt, and the conversations before the chosen and rejected answers, differ")
        prompt, answers = _dialog(candidates[0], "user"), (chosen, rejected)
        rating = record.get("rating")
        if rating is not None and rating not in RATINGS:
            raise _RowError(f"unknown rating {rating!r}; choose one of {list(RATINGS)} or leave it empty")
    return [{"prompt": json.dumps(prompt), "chosen": answers[0], "rejected": answers[1], "rating": rating,
             "task": REAL_TASK, "reference": "{}"}]


# ------------------------------------------------------------------------------------------------- ingest, write
@dataclass
class Ingested:
    """Everything the data stage writes, built in memory (nothing written yet)."""

    tables: dict[str, pa.Table]  # every table of SCHEMAS, with exactly its schema
    sources: list[dict]  # per source: location, format, table, files, rows, skipped, sha256
    real_rows: dict[str, int]  # per table


def _read_source(i: int, src: Source, files) -> tuple[list[dict], dict]:
    digest = hashlib.sha256()
    columns = _header_columns(src)
    if src.hf:
        records = _hf_records(src, columns, digest)
    else:
        records = [r for fs, p, container in files for r in _records(fs, p, container, columns, digest)]
    rows, skipped = [], 0
    for where, record in records:
        try:
            new = _rows(src, record)
        except _RowError as e:
            if not src.skip_invalid:
                raise IngestError(f"data.sources[{i}] ({src.location}): {where}: {e} (skip_invalid: true skips "
                                  "such records)") from None
            skipped += 1
            continue
        rows += new
        if src.limit and len(rows) >= src.limit:
            rows = rows[:src.limit]
            break
    if not rows:
        raise IngestError(f"data.sources[{i}] ({src.location}): no rows" + (f" ({skipped} records skipped as "
                          "invalid)" if skipped else ""))
    info = {"location": src.location, "format": src.format, "table": src.table, "files": len(files) or None,
            "rows": len(rows), "skipped": skipped, "sha256": digest.hexdigest()}
    return rows, info


def build_data(cfg: DataConfig) -> Ingested:
    """The world's kept tables plus every source's rows; raises IngestError before anything is written."""
    files = []  # the cheap checks of every source first: files matched, hf available
    for i, src in enumerate(cfg.sources):
        if src.hf:
            _check_hf(i, src)
        files.append(_resolve(i, src) if src.path else [])
    real: dict[str, list[dict]] = {name: [] for name in SCHEMAS}
    infos = []
    for i, (src, src_files) in enumerate(zip(cfg.sources, files)):
        rows, info = _read_source(i, src, src_files)
        if src.table == "pretrain":
            rows = [{"doc_id": f"src{i:03d}-{n:09d}", **r} for n, r in enumerate(rows)]
        real[src.table] += rows
        infos.append(info)
    world = generate_world(cfg.world) if cfg.synthetic else {}
    tables = {}
    for name, schema in SCHEMAS.items():
        parts = ([world[name]] if name in cfg.synthetic else []) + \
                ([pa.Table.from_pylist(real[name], schema=schema)] if real[name] else [])
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        if real[name] and name != "pretrain" and table.num_rows > 1:
            order = list(range(table.num_rows))
            random.Random(f"{cfg.world.seed}/ingest/{name}").shuffle(order)
            table = table.take(order)
        assert table.schema == schema, name
        tables[name] = table
    return Ingested(tables, infos, {name: len(rows) for name, rows in real.items()})


def write_data(data: Ingested, out_dir: str | Path, extra_json: dict[str, dict] | None = None) -> dict:
    """Write every table as <out_dir>/<table>.parquet (+ sources.json when there are sources, + extra JSON files),
    replacing out_dir atomically; returns the stage metrics."""
    from model.checkpoint import atomic_dir

    with atomic_dir(out_dir) as tmp:
        for name, table in data.tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        files = dict(extra_json or {})
        if data.sources:
            files["sources.json"] = data.sources
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    metrics = {f"rows_{name}": table.num_rows for name, table in data.tables.items()}
    if data.sources:
        metrics.update({f"real_rows_{name}": n for name, n in data.real_rows.items() if n})
        for i, info in enumerate(data.sources):
            metrics[f"source_{i}_rows"], metrics[f"source_{i}_skipped"] = info["rows"], info["skipped"]
    return metrics


def lineage_params(data: Ingested) -> dict[str, str]:
    """MLflow params naming each source and the hash of what was read."""
    params = {}
    for i, s in enumerate(data.sources):
        files = f" ({s['files']} files)" if s["files"] else ""
        params[f"source.{i}"] = f"{s['format']} -> {s['table']}: {s['location']}{files}"[:500]
        params[f"source.{i}.sha256"] = s["sha256"]
    return params


def run_data(cfg: dict | DataConfig, out_dir: str | Path, extra_json: dict[str, dict] | None = None) -> dict:
    """params `data` -> out_dir (all tables); returns the metrics. What flows/data.py does, without MLflow."""
    data = build_data(cfg if isinstance(cfg, DataConfig) else DataConfig.from_dict(cfg))
    return write_data(data, out_dir, extra_json)
