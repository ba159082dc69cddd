"""Reading the data stage's real sources (components/data/ingest.py documents them): finding a path source's files
(local or fsspec), opening them, and iterating their records per container; Hugging Face datasets by name."""

from __future__ import annotations

import csv
import io
import json
import os
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
def file_records(fs, path: str, container: str, columns: tuple[str, ...], digest) -> list[tuple[str, object]]:
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


def hf_records(src: Source, columns: tuple[str, ...], digest) -> list[tuple[str, object]]:
    import datasets

    ds = datasets.load_dataset(src.hf, src.subset, split=src.split or "train", data_dir=src.data_dir)
    url = f"hf:{src.hf}[{src.split or 'train'}]"
    _need(url, columns, ds.column_names)
    digest.update(f"{url}\0{getattr(ds, '_fingerprint', '')}".encode())
    return [(f"{url}: row {n}", row) for n, row in enumerate(ds)]

