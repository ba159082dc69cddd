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
            on labelled documents only and counts the unlabelled ones apart), item ""
  others    task REAL_TASK ("real": not an oracle task, so oracle.score() refuses it loudly instead of scoring it),
            reference "{}", rating null unless the source gives one, is_safety true only for `harmful` sources,
            item "real:<hash of the prompt>" (the RM's item-split validation keeps a prompt's pairs on one side).
When a table gets real rows, its rows (world + real) are shuffled with a seeded permutation (world seed), since
stages take prefixes (the RM's validation pairs, `rejection.sample.prompts`); pretrain keeps its order (the filter
orders by doc_id). With no sources the output is exactly the synthetic world's.

Every source is checked and read before anything is written (keys, format, table, files matched, columns, every
row, with file and line); `skip_invalid: true` skips records that do not fit the format or cannot be read (malformed
JSON, JSON nested deeper than Python's recursion limit, a lone surrogate escape such as "\\ud800", a CSV field over
the cap, text that is not UTF-8) instead of stopping: counted in the metrics (source_<i>_skipped), the first three
reasons in sources.json. The whole output folder is replaced atomically.

Files are streamed record by record (JSON lines, CSV rows, Parquet batches, .txt paragraphs) and decompressed as they
are read; reading stops once `limit` rows are kept. What cannot stream is read whole: a .json array (one JSON
document) and a .txt document without `paragraphs`. `max_decompressed_mb` (per path source, default 4096 MiB) bounds
that, a line, a CSV field, and what a compressed file may expand to: a compression bomb stops with an error naming
the file and the cap instead of filling memory. A file that cannot be read as a whole (over the cap, a malformed or
too deeply nested .json array, a corrupt Parquet file) always stops. The rows kept are held in memory, as Arrow,
until written (real rows are shuffled with the world's). Each source's sha256 covers the names and decompressed bytes
read.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from components.common import config_from_dict
from components.data.ingest_files import IngestError, RecordError, check_hf, file_records, hf_records, resolve
from components.data.ingest_rows import FORMAT_KEYS, FORMATS, REAL_TASK, header_columns, record_rows
from components.data.tables import SCHEMAS, generate_world
from components.data.world import WorldConfig

_BATCH = 10_000  # rows converted to Arrow at a time

__all__ = ["DataConfig", "Source", "IngestError", "Ingested", "FORMATS", "REAL_TASK", "READERS", "build_data",
           "write_data", "run_data", "lineage_params"]


# Which stages read each table: named when a table is missing.
READERS = {"pretrain": "filter", "sft": "sft (and replay in rejection, gatt, distill)", "prefs_helpful": "rm_helpful",
           "prefs_safety": "rm_safety", "rl_prompts": "rejection, ppo, distill", "gatt": "gatt",
           "eval_prompts": "evaluate", "eval_gatt": "evaluate"}
assert set(READERS) == set(SCHEMAS)


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
    skip_invalid: bool = False  # skip records that do not fit the format or cannot be read (counted), not stop
    max_decompressed_mb: int = 4096  # path: the most MiB a compressed file may expand to, and anything read whole
    #                                  (a .json array, a .txt document, a line, a CSV field) may hold

    @property
    def location(self) -> str:
        return f"hf:{self.hf}" if self.hf else str(self.path)


_KEY_TYPES = {"format": str, "path": str, "hf": str, "table": str, "column": str, "paragraphs": bool, "split": str,
              "subset": str, "data_dir": str, "limit": int, "skip_invalid": bool, "max_decompressed_mb": int}


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
    if src.hf and "max_decompressed_mb" in given:
        raise IngestError(f"{where}: max_decompressed_mb applies to path sources only")
    for name in ("limit", "max_decompressed_mb"):
        if getattr(src, name) is not None and getattr(src, name) < 1:
            raise IngestError(f"{where}: {name} must be a positive integer, got {getattr(src, name)!r}")
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
        unknown = sorted(set(d) - {"world", "synthetic", "sources", "too_long"})
        if unknown:
            raise IngestError(f"unknown keys {unknown} in params section 'data'; known keys: "
                              "['sources', 'synthetic', 'too_long', 'world']")
        from components.data.datasets import too_long_policy  # read by the stages that train on the data

        try:
            too_long_policy(d)
        except ValueError as e:
            raise IngestError(str(e)) from None
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


# ------------------------------------------------------------------------------------------------- ingest, write
@dataclass
class Ingested:
    """Everything the data stage writes, built in memory (nothing written yet)."""

    tables: dict[str, pa.Table]  # every table of SCHEMAS, with exactly its schema
    sources: list[dict]  # per source: location, format, table, files, rows, skipped, sha256
    real_rows: dict[str, int]  # per table


def _path_records(src: Source, files, columns: tuple[str, ...], digest):
    for fs, path, container in files:
        yield from file_records(fs, path, container, columns, digest, src.max_decompressed_mb, src.paragraphs)


def _arrow(i: int, src: Source, rows: list[dict], start: int) -> pa.Table:
    """Rows as Arrow (far smaller than Python dicts); pretrain's get their doc_id, numbered from `start`."""
    if src.table == "pretrain":
        rows = [{"doc_id": f"src{i:03d}-{start + n:09d}", **r} for n, r in enumerate(rows)]
    return pa.Table.from_pylist(rows, schema=SCHEMAS[src.table])


def _read_source(i: int, src: Source, files) -> tuple[pa.Table, dict]:
    """Every row of one source (records streamed, so at most `limit` rows are read), and its manifest entry."""
    where = f"data.sources[{i}] ({src.location})"
    digest = hashlib.sha256()
    columns = header_columns(src)
    if src.hf:
        records = hf_records(src, columns, digest)
    else:
        records = _path_records(src, files, columns, digest)
    rows, parts, kept, skipped, examples = [], [], 0, 0, []  # rows: the next batch for `parts`
    try:
        for at, record in records:
            try:
                if isinstance(record, RecordError):  # read, but not readable
                    raise record
                new = record_rows(src, record)
            except (RecordError, RecursionError) as e:  # RecursionError: a value too deeply nested to print
                why = str(e) if isinstance(e, RecordError) else "too deeply nested"
                if not src.skip_invalid:
                    raise IngestError(f"{where}: {at}: {why} (skip_invalid: true skips such records)") from None
                skipped += 1
                examples += [f"{at}: {why}"[:300]] if len(examples) < 3 else []
                continue
            rows += new
            if src.limit and kept + len(rows) >= src.limit:
                rows = rows[:src.limit - kept]
                break
            if len(rows) >= _BATCH:
                parts.append(_arrow(i, src, rows, kept))
                rows, kept = [], kept + len(rows)
    except IngestError as e:  # a file that cannot be read at all
        raise IngestError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    finally:
        records.close()
    table = pa.concat_tables(parts + [_arrow(i, src, rows, kept)])
    if not table.num_rows:
        raise IngestError(f"{where}: no rows" + (f" ({skipped} records skipped as invalid)" if skipped else ""))
    info = {"location": src.location, "format": src.format, "table": src.table, "files": len(files) or None,
            "rows": table.num_rows, "skipped": skipped, "sha256": digest.hexdigest()}
    if examples:
        info["skipped_examples"] = examples
    return table, info


def build_data(cfg: DataConfig) -> Ingested:
    """The world's kept tables plus every source's rows; raises IngestError before anything is written."""
    files = []  # the cheap checks of every source first: files matched, hf available
    for i, src in enumerate(cfg.sources):
        if src.hf:
            check_hf(i, src)
        files.append(resolve(i, src) if src.path else [])
    real: dict[str, list[pa.Table]] = {name: [] for name in SCHEMAS}
    infos = []
    for i, (src, src_files) in enumerate(zip(cfg.sources, files)):
        rows, info = _read_source(i, src, src_files)
        real[src.table].append(rows)
        infos.append(info)
    world = generate_world(cfg.world) if cfg.synthetic else {}
    tables = {}
    for name, schema in SCHEMAS.items():
        parts = ([world[name]] if name in cfg.synthetic else []) + real[name]
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        if real[name] and name != "pretrain" and table.num_rows > 1:
            order = list(range(table.num_rows))
            random.Random(f"{cfg.world.seed}/ingest/{name}").shuffle(order)
            table = table.take(order)
        assert table.schema == schema, name
        tables[name] = table
    return Ingested(tables, infos, {name: sum(t.num_rows for t in parts) for name, parts in real.items()})


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
