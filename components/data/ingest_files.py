"""Reading the data stage's real sources (components/data/ingest.py documents them): finding a path source's files
(local or fsspec), opening them, and iterating their records per container; Hugging Face datasets by name."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

if TYPE_CHECKING:
    from components.data.ingest import Source

CONTAINERS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
              ".csv": "csv", ".tsv": "tsv"}


class IngestError(ValueError):
    """A source that cannot be ingested as configured (the message names the source, and the file and line)."""


class RecordError(ValueError):
    """One record that does not fit the source's format (skipped when skip_invalid)."""


def resolve(i: int, src: Source) -> list[tuple[object, str, str]]:
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


def check_hf(i: int, src: Source) -> None:
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
MIB = 1 << 20
_BUFFER = MIB  # read size
_BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a UTF-16 surrogate escape: lone ones are not Unicode text
_TOO_DEEP = f"JSON nested too deeply to read (over Python's recursion limit, {sys.getrecursionlimit()})"


class _Tap(io.RawIOBase):
    """One file's decompressed bytes as they are read: hashed, and counted against the cap when it is compressed
    (a small .gz can expand to terabytes)."""

    def __init__(self, f, url: str, digest, cap_mb: int | None):
        self.f, self.url, self.digest, self.cap_mb, self.total = f, url, digest, cap_mb, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.f.read(len(buffer))
        buffer[:len(data)] = data
        self.digest.update(data)
        self.total += len(data)
        if self.cap_mb is not None and self.total > self.cap_mb * MIB:
            raise IngestError(f"{self.url}: decompresses to more than max_decompressed_mb ({self.cap_mb} MiB); raise "
                              "the source's max_decompressed_mb if the file is genuine")
        return len(data)


def file_records(fs, path: str, container: str, columns: tuple[str, ...], digest, cap_mb: int,
                 paragraphs: bool = False) -> Iterator[tuple[str, object]]:
    """(where, record) of one file, streamed: record is a dict, a .txt file's text (or one paragraph of it), or a
    RecordError for a record that cannot be read (the caller stops or skips). `columns` must exist in containers
    with a header (Parquet, CSV); JSON records are checked one by one. What is read whole (a JSON array, a .txt
    document, a line, a CSV field) and what a compressed file expands to are bounded by `cap_mb`."""
    from fsspec.utils import infer_compression

    url = fs.unstrip_protocol(path)
    compressed = infer_compression(path) is not None
    digest.update(path.rsplit("/", 1)[-1].encode() + b"\0")  # the name and content, not where the repo lives
    with fs.open(path, "rb", compression="infer") as f, \
            io.BufferedReader(_Tap(f, url, digest, cap_mb if compressed else None), _BUFFER) as stream:
        if container == "parquet":
            yield from _parquet_records(fs, path, url, stream, compressed, columns)
        elif container == "txt" and paragraphs:
            yield from _paragraphs(stream, url, cap_mb)
        elif container == "txt":
            try:
                yield url, _whole(stream, url, cap_mb, "a .txt document").decode("utf-8-sig")
            except UnicodeDecodeError as e:
                yield url, RecordError(f"not UTF-8 text: {e}")
        elif container in ("csv", "tsv"):
            yield from _csv_records(stream, url, "," if container == "csv" else "\t", columns, cap_mb)
        elif container == "json" and stream.peek(_BUFFER)[:_BUFFER].removeprefix(_BOM).lstrip()[:1] == b"[":
            # One JSON document cannot be parsed line by line: it is read whole (bounded by the cap), then its
            # items are decoded one at a time.
            try:
                text = _whole(stream, url, cap_mb, "a .json array").decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise IngestError(f"{url}: not UTF-8 text: {e}") from None
            yield from _json_items(text, url)
        else:  # JSON lines (also accepted in .json files that do not hold an array)
            for n, line in _lines(stream, url, cap_mb):
                if line.strip():
                    yield f"{url}:{n}", _json_record(line)


def _whole(stream, url: str, cap_mb: int, what: str) -> bytearray:
    data = bytearray()
    while chunk := stream.read(_BUFFER):
        data += chunk
        if len(data) > cap_mb * MIB:
            raise IngestError(f"{url}: {what} is read whole, and this one holds more than max_decompressed_mb "
                              f"({cap_mb} MiB); split it (JSON lines stream) or raise the source's max_decompressed_mb")
    return data


def _lines(stream, url: str, cap_mb: int) -> Iterator[tuple[int, bytes]]:
    """(line number, line) from 1, the first line without its byte order mark."""
    n = 0
    while line := stream.readline(cap_mb * MIB + 1):
        n += 1
        if len(line) > cap_mb * MIB:
            raise IngestError(f"{url}:{n}: a line longer than max_decompressed_mb ({cap_mb} MiB)")
        yield n, line.removeprefix(_BOM) if n == 1 else line


def _json_record(line: bytes):
    """One JSON line -> its value, or a RecordError saying why it cannot be read."""
    try:
        text = line.decode("utf-8")
        value = json.loads(text)
    except UnicodeDecodeError as e:
        return RecordError(f"not UTF-8 text: {e}")
    except json.JSONDecodeError as e:
        return RecordError(f"malformed JSON line: {e.msg}")
    except RecursionError:
        return RecordError(_TOO_DEEP)
    return _valid_unicode(value) if _SURROGATE_ESCAPE.search(text) else value


def _valid_unicode(value):
    """`value`, or a RecordError when it holds a lone surrogate (an unpaired \\uD800-\\uDFFF escape), which is not
    Unicode text: writing it to Parquet, or encoding it for the tokenizer, would fail later."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return RecordError(f"a lone surrogate {e.object[e.start:e.end]!r} (an unpaired \\uXXXX escape) is not "
                           "Unicode text")
    except RecursionError:
        return RecordError(_TOO_DEEP)
    return value


def _json_items(text: str, url: str) -> Iterator[tuple[str, object]]:
    """The items of a JSON array, decoded one at a time (never all held at once). A malformed or too deeply nested
    item stops the file: without a parse, where the next item starts is unknown."""
    decoder, check, n = json.JSONDecoder(), _SURROGATE_ESCAPE.search(text) is not None, 0
    pos = _WS.match(text).end()
    if not text.startswith("[", pos):
        raise IngestError(f"{url}: malformed JSON: expecting '['")
    pos = _WS.match(text, pos + 1).end()
    while not (n == 0 and text.startswith("]", pos)):
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise IngestError(f"{url}:{e.lineno}: malformed JSON: {e.msg}") from None
        except RecursionError:
            raise IngestError(f"{url}: item {n}: {_TOO_DEEP}; a .json array cannot skip an item it cannot parse: "
                              "write JSON lines to skip such records") from None
        yield f"{url}: item {n}", _valid_unicode(item) if check else item
        n, pos = n + 1, _WS.match(text, pos).end()
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            raise IngestError(f"{url}:{text.count(chr(10), 0, pos) + 1}: malformed JSON: expecting ',' or ']'")
        pos = _WS.match(text, pos + 1).end()
    if _WS.match(text, pos + 1).end() != len(text):
        raise IngestError(f"{url}:{text.count(chr(10), 0, pos) + 1}: malformed JSON: extra data after the array")


def _paragraphs(stream, url: str, cap_mb: int) -> Iterator[tuple[str, object]]:
    """A .txt file's blank-line-separated paragraphs, at their first line; a paragraph with a line that is not
    UTF-8 is a RecordError."""
    parts, first, size, error = [], 0, 0, None
    for n, line in itertools.chain(_lines(stream, url, cap_mb), [(0, b"")]):  # (0, b""): the end
        if line.strip():
            first, size = first or n, size + len(line)
            if size > cap_mb * MIB:
                raise IngestError(f"{url}:{first}: a paragraph longer than max_decompressed_mb ({cap_mb} MiB)")
            try:
                parts.append(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                error = error or RecordError(f"not UTF-8 text (line {n}): {e}")
        elif parts or error:
            yield f"{url}:{first}", error or "".join(parts)
            parts, first, size, error = [], 0, 0, None


def _csv_records(stream, url: str, delimiter: str, columns: tuple[str, ...], cap_mb: int):
    reader = csv.DictReader(io.TextIOWrapper(stream, encoding="utf-8-sig", newline=""), delimiter=delimiter)
    header = _csv_step(reader, url, cap_mb, lambda: reader.fieldnames)
    if isinstance(header, RecordError):
        raise IngestError(f"{url}:{reader.reader.line_num}: unreadable CSV header: {header}")
    _need(url, columns, header or [])
    while (row := _csv_step(reader, url, cap_mb, lambda: next(reader, None))) is not None:
        yield f"{url}:{reader.reader.line_num}", row  # the csv reader's count: DictReader's lags after an error


def _csv_step(reader, url: str, cap_mb: int, step):
    """step() with csv's field limit (process-wide, 128 KiB by default) raised to the cap only meanwhile; a record
    that csv cannot read -> RecordError."""
    old = csv.field_size_limit(cap_mb * MIB)
    try:
        return step()
    except csv.Error as e:
        return RecordError(f"a field longer than max_decompressed_mb ({cap_mb} MiB)" if "field limit" in str(e)
                           else f"unreadable CSV record: {e}")
    except UnicodeDecodeError as e:
        raise IngestError(f"{url}: not UTF-8 text (after line {reader.reader.line_num}): {e}") from None
    finally:
        csv.field_size_limit(old)


def _parquet_records(fs, path: str, url: str, stream, compressed: bool, columns: tuple[str, ...]):
    """Parquet needs random access: a plain file is hashed in one pass, then read in place; a compressed one is
    decompressed (hashed, capped) into a temporary file. Rows come a batch at a time."""
    with tempfile.TemporaryFile() if compressed else fs.open(path, "rb") as f:
        while chunk := stream.read(_BUFFER):
            if compressed:
                f.write(chunk)
        try:
            parquet = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
            raise IngestError(f"{url}: not a readable Parquet file: {e}") from None
        _need(url, columns, parquet.schema_arrow.names)
        batches, n = parquet.iter_batches(batch_size=1024), 0
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:  # noqa: BLE001
                raise IngestError(f"{url}: not a readable Parquet file (after row {n}): {e}") from None
            if batch is None:
                return
            for row in batch.to_pylist():
                yield f"{url}: row {n}", row
                n += 1


def _need(url: str, columns: tuple[str, ...], have: list[str]) -> None:
    missing = [c for c in columns if c not in have]
    if missing:
        raise IngestError(f"{url}: missing column(s) {missing}; columns: {list(have)}")


def hf_records(src: Source, columns: tuple[str, ...], digest) -> Iterator[tuple[str, object]]:
    import datasets

    ds = datasets.load_dataset(src.hf, src.subset, split=src.split or "train", data_dir=src.data_dir)
    url = f"hf:{src.hf}[{src.split or 'train'}]"
    _need(url, columns, ds.column_names)
    digest.update(f"{url}\0{getattr(ds, '_fingerprint', '')}".encode())
    for n, row in enumerate(ds):
        yield f"{url}: row {n}", row

