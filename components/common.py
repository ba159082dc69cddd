"""Small shared helpers: dataclass configs from dicts (unknown keys rejected), JSON I/O, repo paths."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from pathlib import Path
from typing import TypeVar

import yaml

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-05` (no dot) is a string; `dvc exp run -S sft.lr=1e-5` writes just that.
    This loader reads YAML 1.2 floats as floats."""


_Yaml12Loader.add_implicit_resolver(  # a dot or an exponent: integers stay integers
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def load_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


def config_from_dict(cls: type[T], data: dict | None, section: str = "") -> T:
    """Build a config dataclass; unknown keys, and a value that is not a number where the field is one, are errors
    naming the section and the key (an int where a float is expected is converted)."""
    data = dict(data or {})
    where = f"params section {section!r}" if section else cls.__name__
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {where}; known keys: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        kind = hints[key]
        if kind is float and type(value) is int:
            data[key] = value = float(value)
        if kind in (int, float) and type(value) is not kind:  # type(): True is not an int here
            raise ValueError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
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
