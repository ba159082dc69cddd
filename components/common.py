"""Small shared helpers: dataclass configs from dicts (unknown keys rejected), JSON I/O, repo paths."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent


def config_from_dict(cls: type[T], data: dict | None, section: str = "") -> T:
    """Build a config dataclass; unknown keys are an error naming the section and the known keys."""
    data = dict(data or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"params section {section!r}" if section else cls.__name__
        raise ValueError(f"unknown keys {unknown} in {where}; known keys: {sorted(known)}")
    return cls(**data)


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (temp file + rename): a killed process never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    tmp.replace(path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())
