"""components/data/ingest.py: every format on small hand-written files (local and memory://), the world's exact schemas,
real rows added to the world's tables, the consumers' own code on real rows, and every error path."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import sys
import tracemalloc
import types
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.data import ingest, ingest_files, oracle
from components.data.ingest import REAL_TASK, DataConfig, IngestError, build_data, lineage_params, run_data
from components.data.ingest_rows import real_item
from components.data.tables import SCHEMAS, generate_world
from components.data.world import WorldConfig

SMALL_WORLD = {"n_pretrain_docs": 20, "n_sft": 10, "n_pref_pairs": 10, "n_rl_prompts": 10, "n_gatt_dialogs": 4,
               "n_eval_prompts": 10, "n_eval_gatt": 4}
HH_CHOSEN = "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help."
HH_REJECTED = "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant: Use a pin."


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _only(tmp_path: Path, *sources: dict, synthetic=False) -> dict[str, pa.Table]:
    """The tables of a data config with these sources (missing tables are fine here: filled from the world)."""
    cfg = {"world": SMALL_WORLD, "synthetic": synthetic, "sources": list(sources)}
    if synthetic is False:
        fed = {s.get("table") or ingest.FORMATS[s["format"]][0] for s in sources}
        cfg["synthetic"] = [t for t in SCHEMAS if t not in fed]
    data = build_data(DataConfig.from_dict(cfg))
    for name, table in data.tables.items():
        assert table.schema == SCHEMAS[name], name  # exactly the world's schema, always
    return {name: table for name, table in data.tables.items() if data.real_rows[name]}


def _dialogs(table: pa.Table, column: str) -> list:
    return [json.loads(m) for m in table.column(column).to_pylist()]


# ----------------------------------------------------------------------------------------------------- formats
def test_text_files_one_document_per_file_or_paragraph(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("First doc line one.\nLine two.\n\nStill the first doc.\n")
    (tmp_path / "corpus" / "b.txt").write_text("Second doc.")
    (tmp_path / "corpus" / ".hidden.txt").write_text("never read")
    pretrain = _only(tmp_path, {"path": str(tmp_path / "corpus" / "*.txt"), "format": "text"})["pretrain"]
    assert pretrain.to_pylist() == [
        {"doc_id": "src000-000000000", "text": "First doc line one.\nLine two.\n\nStill the first doc.\n",
         "planted": None, "pii_kinds": None, "item": ""},
        {"doc_id": "src000-000000001", "text": "Second doc.", "planted": None, "pii_kinds": None, "item": ""}]
    # A folder means every non-hidden file under it; paragraphs split on blank lines.
    pretrain = _only(tmp_path, {"path": str(tmp_path / "corpus"), "format": "text", "paragraphs": True})["pretrain"]
    assert pretrain.column("text").to_pylist() == ["First doc line one.\nLine two.", "Still the first doc.",
                                                   "Second doc."]


@pytest.mark.parametrize("batch", [10_000, 1])
def test_text_column_of_jsonl_parquet_and_gzip(tmp_path, monkeypatch, batch):
    monkeypatch.setattr(ingest, "_BATCH", batch)  # rows go to Arrow `batch` at a time: the same tables
    _jsonl(tmp_path / "docs.jsonl", [{"body": "A jsonl doc.", "id": 1}, {"body": "Another one."}])
    pq.write_table(pa.table({"text": ["A parquet doc."], "other": [1]}), tmp_path / "docs.parquet")
    with gzip.open(tmp_path / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "Compressed."}) + "\n")
    tables = _only(tmp_path, {"path": str(tmp_path / "*.jsonl*"), "format": "text", "column": "body"},
                   {"path": str(tmp_path / "docs.parquet"), "format": "text", "limit": 1})
    texts = tables["pretrain"].column("text").to_pylist()
    assert texts == ["A jsonl doc.", "Another one.", "Compressed.", "A parquet doc."]
    assert tables["pretrain"].column("doc_id").to_pylist() == [f"src000-00000000{n}" for n in range(3)] + [
        "src001-000000000"]


def test_alpaca_to_sft_and_rl_prompts(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                                {"instruction": "Say hi.", "input": "", "output": "Hi!"}]))
    sft = _only(tmp_path, {"path": str(path), "format": "alpaca"})["sft"]
    assert sorted(_dialogs(sft, "messages"), key=json.dumps) == [
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]]
    assert set(sft.column("task").to_pylist()) == {REAL_TASK}
    rl = _only(tmp_path, {"path": str(path), "format": "alpaca", "table": "rl_prompts"})["rl_prompts"]
    assert _dialogs(rl, "prompt") == [[{"role": "user", "content": "Add the numbers.\n\n2 and 3"}],
                                      [{"role": "user", "content": "Say hi."}]]
    assert rl.column("is_safety").to_pylist() == [False, False] and set(rl.column("reference").to_pylist()) == {"{}"}


def test_openai_and_sharegpt_messages(tmp_path):
    openai = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}]
    _jsonl(tmp_path / "chats.jsonl", [{"messages": openai}])
    (tmp_path / "share.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
        {"from": "gpt", "value": "A2"}]}]))
    pq.write_table(pa.table({"dialog": [json.dumps(openai)]}), tmp_path / "chats.parquet")  # JSON string column
    sources = [{"path": str(tmp_path / "chats.jsonl"), "format": "messages"},
               {"path": str(tmp_path / "share.json"), "format": "messages"},
               {"path": str(tmp_path / "chats.parquet"), "format": "messages", "column": "dialog"}]
    dialogs = _dialogs(_only(tmp_path, *sources)["sft"], "messages")
    assert sorted(map(json.dumps, dialogs)) == sorted(map(json.dumps, [openai, openai, [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]]))
    # As RL prompts: the final answer is dropped; a conversation ending with the user turn is kept as is.
    _jsonl(tmp_path / "open.jsonl", [{"messages": openai[:2]}])
    rl = _only(tmp_path, {"path": str(tmp_path / "chats.jsonl"), "format": "messages", "table": "rl_prompts"},
               {"path": str(tmp_path / "open.jsonl"), "format": "messages", "table": "rl_prompts"})["rl_prompts"]
    assert _dialogs(rl, "prompt") == [openai[:2], openai[:2]]


def test_preference_pairs(tmp_path):
    convo = [{"role": "user", "content": "Capital of France?"}]
    _jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome.", "rating": "better"},
        {"chosen": convo + [{"role": "assistant", "content": "Paris."}],  # TRL implicit prompt
         "rejected": convo + [{"role": "assistant", "content": "Lyon."}]},
        {"prompt": convo, "chosen": [{"role": "assistant", "content": "Paris!"}],  # TRL explicit prompt
         "rejected": [{"role": "assistant", "content": "No idea."}]},
        {"conversations": [{"from": "human", "value": "Capital of France?"}],  # LLaMA-Factory ShareGPT prefs
         "chosen": {"from": "gpt", "value": "Paris, France."}, "rejected": {"from": "gpt", "value": "Berlin."}},
        {"conversations": [{"from": "human", "value": "Capital of France?"}], "system": "Be brief.",
         "chosen": {"from": "gpt", "value": "Paris"}, "rejected": {"from": "gpt", "value": "Bern."}}])
    prefs = _only(tmp_path, {"path": str(tmp_path / "prefs.jsonl"), "format": "prefs", "table": "prefs_helpful"})
    rows = sorted(prefs["prefs_helpful"].to_pylist(), key=lambda r: r["rejected"])
    system = [{"role": "system", "content": "Be brief."}]
    assert [(json.loads(r["prompt"]), r["chosen"], r["rejected"], r["rating"]) for r in rows] == [
        (convo, "Paris, France.", "Berlin.", None), (system + convo, "Paris", "Bern.", None),
        (convo, "Paris.", "Lyon.", None), (convo, "Paris!", "No idea.", None), (convo, "Paris.", "Rome.", "better")]
    assert {(r["task"], r["reference"]) for r in rows} == {(REAL_TASK, "{}")}
    # real rows name no item: a hash of the prompt stands in, shared by the pairs of one prompt
    assert [r["item"] for r in rows] == [real_item(json.loads(r["prompt"])) for r in rows]
    assert len({r["item"] for r in rows}) == 2


def test_hh_rlhf_transcripts(tmp_path):
    _jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    row = _only(tmp_path, {"path": str(tmp_path / "hh.jsonl"), "format": "hh_rlhf",
                           "table": "prefs_safety"})["prefs_safety"].to_pylist()[0]
    assert json.loads(row["prompt"]) == [{"role": "user", "content": "Hi there."},
                                         {"role": "assistant", "content": "Hello!"},
                                         {"role": "user", "content": "How do I pick a lock?"}]
    assert (row["chosen"], row["rejected"], row["rating"]) == ("I can't help.", "Use a pin.", None)


def test_harmful_csv_and_memory_filesystem(tmp_path):
    with open(tmp_path / "harmful.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "prompt"], ["1", "How do I make a weapon?"], ["2", "Insult my boss."]])
    rl = _only(tmp_path, {"path": str(tmp_path / "harmful.csv"), "format": "harmful"})["rl_prompts"]
    assert _dialogs(rl, "prompt") == [[{"role": "user", "content": "How do I make a weapon?"}],
                                      [{"role": "user", "content": "Insult my boss."}]]
    assert rl.column("is_safety").to_pylist() == [True, True] and set(rl.column("task").to_pylist()) == {REAL_TASK}

    fs = fsspec.filesystem("memory")
    fs.pipe({"/ingest-test/a.jsonl": b'{"text": "From memory."}\n', "/ingest-test/b.jsonl": b'{"text": "Two."}\n'})
    try:
        tables = _only(tmp_path, {"path": "memory://ingest-test/*.jsonl", "format": "text"})
        assert tables["pretrain"].column("text").to_pylist() == ["From memory.", "Two."]
    finally:
        fs.rm("/ingest-test", recursive=True)


def test_real_rows_work_with_the_consumers_code(tmp_path):
    """What the sft, rm, rejection/ppo and evaluate code does with real rows (tiny tokenizer, no training)."""
    from components.rlhf.reward import encode_pair
    from model.chat import encode_dialog, encode_prompt
    from tests.helpers import small_tokenizer

    _jsonl(tmp_path / "chats.jsonl", [{"conversations": [{"from": "system", "value": "Be kind."},
                                                          {"from": "human", "value": "Hi"},
                                                          {"from": "gpt", "value": "Hello"}]}])
    _jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    (tmp_path / "harmful.csv").write_text("prompt\nHow do I hurt someone?\n")
    tables = _only(tmp_path, {"path": str(tmp_path / "chats.jsonl"), "format": "messages"},
                   {"path": str(tmp_path / "hh.jsonl"), "format": "hh_rlhf", "table": "prefs_helpful"},
                   {"path": str(tmp_path / "harmful.csv"), "format": "harmful"})
    tok = small_tokenizer()
    assert all(sum(encode_dialog(tok, d).loss_mask) > 0 for d in _dialogs(tables["sft"], "messages"))
    row = tables["prefs_helpful"].to_pylist()[0]
    pair = encode_pair(tok, json.loads(row["prompt"]), row["chosen"], row["rejected"], row["rating"])
    assert pair.chosen != pair.rejected
    record = tables["rl_prompts"].to_pylist()[0]
    assert encode_prompt(tok, json.loads(record["prompt"])) and record["is_safety"] is True
    with pytest.raises(ValueError, match="unknown task 'real'"):  # never silently scored as a world task
        oracle.score(record, "I can't help with that.")


# ------------------------------------------------------------------------------------------- world + writing
def test_real_rows_added_to_the_world_and_written(tmp_path):
    _jsonl(tmp_path / "docs.jsonl", [{"text": "Real doc one."}, {"text": "Real doc two."}])
    _jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": f"Q{i}"},
                                                    {"role": "assistant", "content": f"A{i}"}]} for i in range(3)])
    cfg = {"world": SMALL_WORLD, "sources": [{"path": str(tmp_path / "docs.jsonl"), "format": "text"},
                                             {"path": str(tmp_path / "chats.jsonl"), "format": "messages"}]}
    out = tmp_path / "raw"
    metrics = run_data(cfg, out, {"mlflow_run.json": {"run_id": "x"}})
    world = generate_world(WorldConfig.from_dict(SMALL_WORLD))
    tables = {p.stem: pq.read_table(p) for p in out.glob("*.parquet")}
    assert set(tables) == set(SCHEMAS) and all(tables[n].schema == SCHEMAS[n] for n in SCHEMAS)
    # pretrain: the world's documents, in order, then the real ones (after them in doc_id order too)
    assert tables["pretrain"].slice(0, world["pretrain"].num_rows).equals(world["pretrain"])
    assert tables["pretrain"].column("doc_id").to_pylist()[-2:] == ["src000-000000000", "src000-000000001"]
    assert sorted(tables["pretrain"].column("doc_id").to_pylist()) == tables["pretrain"].column("doc_id").to_pylist()
    # sft: world + real rows, shuffled together (stages take prefixes), deterministic
    sft = tables["sft"].to_pylist()
    assert len(sft) == 13 and sorted(map(str, sft)) == sorted(map(str, world["sft"].to_pylist() + [
        {"messages": json.dumps([{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]),
         "task": REAL_TASK, "item": real_item([{"role": "user", "content": f"Q{i}"}])} for i in range(3)]))
    assert sft != world["sft"].to_pylist() + sft[10:]  # mixed, not appended
    for name in ("prefs_helpful", "rl_prompts", "gatt", "eval_prompts"):  # untouched tables: the world's, exactly
        assert tables[name].equals(world[name])
    assert metrics["rows_sft"] == 13 and metrics["real_rows_sft"] == 3 and metrics["real_rows_pretrain"] == 2
    assert (metrics["source_0_rows"], metrics["source_1_rows"], metrics["source_1_skipped"]) == (2, 3, 0)
    manifest = json.loads((out / "sources.json").read_text())
    assert [(s["format"], s["table"], s["rows"], s["files"]) for s in manifest] == [("text", "pretrain", 2, 1),
                                                                                    ("messages", "sft", 3, 1)]
    assert json.loads((out / "mlflow_run.json").read_text()) == {"run_id": "x"}
    params = lineage_params(build_data(DataConfig.from_dict(cfg)))
    assert params["source.0.sha256"] == manifest[0]["sha256"] and params["source.1"].startswith("messages -> sft")
    assert run_data(cfg, tmp_path / "again") == metrics  # deterministic
    assert (tmp_path / "again" / "sft.parquet").read_bytes() == (out / "sft.parquet").read_bytes()


def test_no_sources_is_exactly_the_world(tmp_path):
    metrics = run_data({"world": SMALL_WORLD, "sources": []}, tmp_path / "raw")
    world = generate_world(WorldConfig.from_dict(SMALL_WORLD))
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(f"{n}.parquet" for n in SCHEMAS)
    assert all(pq.read_table(tmp_path / "raw" / f"{n}.parquet").equals(t) for n, t in world.items())
    assert metrics == {f"rows_{n}": t.num_rows for n, t in world.items()}


def test_synthetic_false_needs_every_table(tmp_path):
    _jsonl(tmp_path / "docs.jsonl", [{"text": "Real doc."}])
    src = {"path": str(tmp_path / "docs.jsonl"), "format": "text"}
    with pytest.raises(IngestError, match=r"no data for tables sft \(read by sft.*prefs_helpful \(read by "
                                          r"rm_helpful\).*eval_gatt \(read by evaluate\)") as e:
        DataConfig.from_dict({"synthetic": False, "sources": [src]})
    assert "pretrain" not in str(e.value)
    with pytest.raises(IngestError, match=r"no data for tables pretrain \(read by filter\)$|no data for tables "
                                          r"pretrain \(read by filter\):"):
        DataConfig.from_dict({"synthetic": [t for t in SCHEMAS if t != "pretrain"]})
    kept = [t for t in SCHEMAS if t != "pretrain"]
    tables = build_data(DataConfig.from_dict({"world": SMALL_WORLD, "synthetic": kept, "sources": [src]})).tables
    assert tables["pretrain"].column("doc_id").to_pylist() == ["src000-000000000"]  # real documents only


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("sources, message", [
    ([{"path": "x.txt", "format": "text", "colum": "t"}], r"unknown keys \['colum'\] in params section "
                                                           r"'data.sources\[0\]'; known keys"),
    ([{"path": "x.txt"}], r"data.sources\[0\]: `format` is required"),
    ([{"path": "x.txt", "format": "pdf"}], r"unknown format 'pdf'; choose one of"),
    ([{"path": "x.txt", "format": "text", "table": "sft"}], r"format 'text' cannot feed table 'sft'; it feeds"),
    ([{"path": "x.txt", "format": "text", "table": "nope"}], r"cannot feed table 'nope'.*\(tables: "),
    ([{"path": "x.jsonl", "format": "prefs"}], r"format 'prefs' needs `table`: one of \['prefs_helpful', "),
    ([{"path": "x.jsonl", "hf": "a/b", "format": "prefs", "table": "prefs_safety"}], r"exactly one of path"),
    ([{"format": "text"}], r"exactly one of path"),
    ([{"path": "x.json", "format": "alpaca", "column": "c"}], r"\['column'\] do not apply to format 'alpaca'"),
    ([{"path": "x.json", "format": "text", "split": "test"}], r"\['split'\] apply to hf sources only"),
    ([{"path": "x.json", "format": "text", "limit": 0}], r"limit must be a positive integer"),
    ([{"path": "x.json", "format": "text", "max_decompressed_mb": 0}], r"max_decompressed_mb must be a positive"),
    ([{"hf": "a/b", "format": "text", "max_decompressed_mb": 9}], r"max_decompressed_mb applies to path sources"),
    ([{"path": "x.json", "format": "text", "paragraphs": "yes"}], r"paragraphs must be bool, got 'yes'"),
    ([{"path": ["a.txt"], "format": "text"}], r"path must be str"),
    (["x.txt"], r"data.sources\[0\] must be a mapping"),
])
def test_config_errors(sources, message):
    with pytest.raises(IngestError, match=message):
        DataConfig.from_dict({"sources": sources})


def test_data_section_errors():
    with pytest.raises(IngestError, match=r"unknown keys \['source'\] in params section 'data'"):
        DataConfig.from_dict({"source": []})
    with pytest.raises(IngestError, match=r"data.synthetic: unknown tables \['sfts'\]"):
        DataConfig.from_dict({"synthetic": ["sfts"]})
    with pytest.raises(IngestError, match="data.synthetic must be true, false or a list of tables"):
        DataConfig.from_dict({"synthetic": None})
    with pytest.raises(IngestError, match="data.sources must be a list"):
        DataConfig.from_dict({"sources": {"path": "x"}})
    with pytest.raises(IngestError, match=r"params section 'data.world'"):
        DataConfig.from_dict({"world": {"n_sfts": 3}})


def _fails(tmp_path: Path, source: dict, message: str) -> None:
    """The source fails with this message, and the existing output folder is left untouched."""
    out = tmp_path / "raw"
    out.mkdir(exist_ok=True)
    (out / "old.parquet").write_bytes(b"previous")
    with pytest.raises(IngestError, match=message):
        run_data({"world": SMALL_WORLD, "sources": [source]}, out)
    assert [p.name for p in out.iterdir()] == ["old.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folder left


def test_file_errors(tmp_path):
    _fails(tmp_path, {"path": str(tmp_path / "none" / "*.jsonl"), "format": "text"}, "no files matched the glob")
    _fails(tmp_path, {"path": str(tmp_path / "missing.jsonl"), "format": "text"}, "no such file or folder")
    (tmp_path / "data.xml").write_text("<x/>")
    _fails(tmp_path, {"path": str(tmp_path / "data.xml"), "format": "text"}, "cannot tell the container")
    (tmp_path / "notes.txt").write_text("text")
    _fails(tmp_path, {"path": str(tmp_path / "notes.txt"), "format": "alpaca"}, "reads records, not plain text")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "docs.parquet")
    _fails(tmp_path, {"path": str(tmp_path / "docs.parquet"), "format": "text"},
           r"docs.parquet: missing column\(s\) \['text'\]; columns: \['body'\]")
    (tmp_path / "harmful.csv").write_text("question\nHow?\n")
    _fails(tmp_path, {"path": str(tmp_path / "harmful.csv"), "format": "harmful"},
           r"harmful.csv: missing column\(s\) \['prompt'\]")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": "broken\n')
    _fails(tmp_path, {"path": str(tmp_path / "bad.jsonl"), "format": "text"}, r"bad.jsonl:3: malformed JSON line")
    (tmp_path / "bad.json").write_text('[{"instruction": "a",\n "output": }]')
    _fails(tmp_path, {"path": str(tmp_path / "bad.json"), "format": "alpaca"}, r"bad.json:2: malformed JSON")
    _fails(tmp_path, {"path": "nosuchproto://bucket/x.jsonl", "format": "text"}, "cannot open this location")


def test_row_errors_and_skip_invalid(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "no"}]},
            {"messages": [{"role": "user", "content": "Hi"}]},
            {"text": "no messages"}]
    path = _jsonl(tmp_path / "chats.jsonl", rows)
    _fails(tmp_path, {"path": str(path), "format": "messages"},
           r"data.sources\[0\] \(.*chats.jsonl\): .*chats.jsonl:2: roles out of order at turn 0 .*skip_invalid")
    data = build_data(DataConfig.from_dict({"world": SMALL_WORLD, "sources": [
        {"path": str(path), "format": "messages", "skip_invalid": True}]}))
    assert (data.sources[0]["rows"], data.sources[0]["skipped"]) == (1, 3)
    _jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("Hi there", "Yo")}])
    _fails(tmp_path, {"path": str(tmp_path / "hh.jsonl"), "format": "hh_rlhf", "table": "prefs_safety"},
           r"hh.jsonl:1: chosen and rejected differ before their final answers")
    _jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B", "rating": "much_better"}])
    _fails(tmp_path, {"path": str(tmp_path / "prefs.jsonl"), "format": "prefs", "table": "prefs_helpful"},
           r"prefs.jsonl:1: unknown rating 'much_better'")
    _jsonl(tmp_path / "empty.jsonl", [{"text": "  "}])
    _fails(tmp_path, {"path": str(tmp_path / "empty.jsonl"), "format": "text", "skip_invalid": True},
           r"no rows \(1 records skipped as invalid\)")
    _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Do it."}])
    _fails(tmp_path, {"path": str(tmp_path / "alpaca.jsonl"), "format": "alpaca"},
           r"alpaca.jsonl:1: no 'output' field \(fields: \['instruction'\]\)")


def _read(source: dict):
    """(rows, skipped) of one source (the world's tables for the rest)."""
    data = build_data(DataConfig.from_dict({"world": SMALL_WORLD, "sources": [source]}))
    return data.sources[0]["rows"], data.sources[0]["skipped"]


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".bz2", lambda p, m: bz2.open(p, m, 1)),
                                            (".xz", lambda p, m: lzma.open(p, m, preset=0))], ids=["gz", "bz2", "xz"])
def test_a_compression_bomb_stops_at_the_cap(tmp_path, suffix, opener):
    path = tmp_path / f"bomb.jsonl{suffix}"
    with opener(path, "wb") as f:  # 5 MiB of JSON lines in a few KB
        f.write(b"".join(b'{"text": "%s"}\n' % (b"a" * 90) for _ in range(50_000)))
    assert path.stat().st_size < 100_000
    src = {"path": str(path), "format": "text", "max_decompressed_mb": 2}
    for skip in (False, True):  # not a record to skip: the file stops
        _fails(tmp_path, {**src, "skip_invalid": skip},
               rf"data.sources\[0\] .*bomb.jsonl{suffix}: decompresses to more than max_decompressed_mb \(2 MiB\)")
    assert _read({**src, "limit": 10}) == (10, 0)  # streamed: reading stops at `limit`, far before the cap
    if suffix == ".gz":
        assert _read({**src, "max_decompressed_mb": 6}) == (50_000, 0)


def test_what_is_read_whole_is_bounded_by_the_cap(tmp_path):
    (tmp_path / "big.json").write_text(json.dumps([{"instruction": "Say a.", "output": "a" * 1000}] * 1500))
    _fails(tmp_path, {"path": str(tmp_path / "big.json"), "format": "alpaca", "max_decompressed_mb": 1},
           r"big.json: a .json array is read whole, and this one holds more than max_decompressed_mb \(1 MiB\)")
    assert _read({"path": str(tmp_path / "big.json"), "format": "alpaca", "max_decompressed_mb": 2}) == (1500, 0)
    (tmp_path / "long.txt").write_text("word " * 300_000)
    _fails(tmp_path, {"path": str(tmp_path / "long.txt"), "format": "text", "max_decompressed_mb": 1},
           r"long.txt: a .txt document is read whole")


def test_unreadable_records_name_file_and_line_and_can_be_skipped(tmp_path):
    """Python's csv field limit, RecursionError on deep JSON, and lone surrogates (which fail only when the Parquet
    is written or the text encoded) become errors at the file and line, or skipped records with skip_invalid."""
    (tmp_path / "long_field.csv").write_text(f'id,prompt\n1,Short?\n2,"{"x" * (2 << 20)}"\n3,"Also, short?"\n')
    (tmp_path / "deep.jsonl").write_text('{"text": "ok"}\n{"text": %s}\n{"text": "ok too"}\n'
                                         % ("[" * 100_000 + "]" * 100_000))
    (tmp_path / "surrogate.jsonl").write_text('{"text": "ok \\ud83d\\ude00"}\n{"text": "bad \\ud800 here"}\n')
    (tmp_path / "surrogate.json").write_text('[{"instruction": "\\udfff", "output": "x"},\n'
                                             ' {"instruction": "fine", "output": "y"}]')
    cases = [({"format": "harmful", "path": "long_field.csv", "max_decompressed_mb": 1},
              r"long_field.csv:3: a field longer than max_decompressed_mb \(1 MiB\)"),
             ({"format": "text", "path": "deep.jsonl"}, r"deep.jsonl:2: JSON nested too deeply to read"),
             ({"format": "text", "path": "surrogate.jsonl"},
              r"surrogate.jsonl:2: a lone surrogate '\\ud800' \(an unpaired \\uXXXX escape\) is not Unicode text"),
             ({"format": "alpaca", "path": "surrogate.json"}, r"surrogate.json: item 0: a lone surrogate '\\udfff'")]
    for source, message in cases:
        source = {**source, "path": str(tmp_path / source["path"])}
        _fails(tmp_path, source, rf"data.sources\[0\] \(.*\): .*{message}.*\(skip_invalid: true skips such records\)")
        assert csv.field_size_limit() == 128 * 1024  # csv's process-wide limit is restored
        assert _read({**source, "skip_invalid": True})[1] == 1
    metrics = run_data({"world": SMALL_WORLD, "sources": [
        {"format": "text", "path": str(tmp_path / "surrogate.jsonl"), "skip_invalid": True},
        {"format": "harmful", "path": str(tmp_path / "long_field.csv"), "max_decompressed_mb": 1,
         "skip_invalid": True}]}, tmp_path / "written")
    assert (metrics["source_0_rows"], metrics["source_0_skipped"]) == (1, 1)
    assert (metrics["source_1_rows"], metrics["source_1_skipped"]) == (2, 1)
    assert pq.read_table(tmp_path / "written" / "pretrain.parquet").column("text").to_pylist()[-1] == "ok \U0001F600"
    manifest = json.loads((tmp_path / "written" / "sources.json").read_text())
    assert manifest[0]["skipped_examples"] == [f"file://{tmp_path}/surrogate.jsonl:2: a lone surrogate '\\ud800' "
                                               "(an unpaired \\uXXXX escape) is not Unicode text"]
    # A .json array is one document: an item too deep to parse stops the file, skip_invalid or not.
    (tmp_path / "deep.json").write_text('[{"text": "ok"}, {"text": %s}]' % ("[" * 100_000 + "]" * 100_000))
    _fails(tmp_path, {"format": "text", "path": str(tmp_path / "deep.json"), "skip_invalid": True},
           r"deep.json: item 1: JSON nested too deeply .* write JSON lines to skip such records")


def test_a_compressed_jsonl_is_streamed_in_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wt") as f:  # 20 MiB decompressed, of which the rows keep a few KB
        f.writelines(json.dumps({"text": f"doc {i}", "other": "y" * 10_000}) + "\n" for i in range(2000))
    cfg = DataConfig.from_dict({"world": SMALL_WORLD, "sources": [{"path": str(path), "format": "text"}]})
    tracemalloc.start()
    try:
        data = build_data(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data.real_rows["pretrain"] == 2000
    assert peak < 8 << 20, peak  # reading the file whole would hold its 20 MiB at least twice


def test_hugging_face_needs_datasets_and_a_network(tmp_path, monkeypatch):
    src = {"hf": "Anthropic/hh-rlhf", "format": "hh_rlhf", "table": "prefs_safety", "data_dir": "harmless-base"}
    monkeypatch.setitem(sys.modules, "datasets", None)  # not importable
    _fails(tmp_path, src, r"data.sources\[0\] \(hf:Anthropic/hh-rlhf\): .*need the `datasets` package")
    monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(tmp_path, src, r"need a network, and this machine is offline")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(ingest_files, "_online", lambda: False)
    _fails(tmp_path, src, r"this machine is offline")
