"""Small shared helpers: dataclass configs from dicts (unknown keys rejected), JSON I/O, repo paths."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
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
    """Build a config dataclass, nested ones included: unknown keys, and a value of the wrong type (a str where a
    number is expected, a bool where an int is, a scalar where a section is), are errors naming the section and the
    key (an int where a float is expected is converted; a list where a tuple is)."""
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{_where(cls, section)} must be a mapping of keys to values, got {data!r}")
    data = dict(data or {})
    where = _where(cls, section)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {where}; known keys: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        data[key] = _typed(hints[key], value, f"{section}.{key}" if section else key, where, key)
    try:
        return cls(**data)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{where}: {e}") from None


def _where(cls: type, section: str) -> str:
    return f"params section {section!r}" if section else cls.__name__


def _typed(kind, value, path: str, where: str, key: str):
    """value checked (and converted) against the type hint `kind`."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union \
        else (kind,)
    if value is None and type(None) in options:
        return None
    kinds = [k for k in options if k is not type(None)]
    if len(kinds) != 1:
        return value
    kind, origin = kinds[0], typing.get_origin(kinds[0]) or kinds[0]
    if dataclasses.is_dataclass(kind):
        return value if isinstance(value, kind) else config_from_dict(kind, value, path)
    if kind is float and type(value) is int:
        return float(value)
    if origin is tuple and type(value) is list:
        value = tuple(value)
    if origin in (int, float, bool, str, list, tuple, dict) and type(value) is not origin:  # True is not an int
        raise ValueError(f"{where}: {key} must be {origin.__name__}, got {value!r}")
    return value


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (temp file + rename): a killed process never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    tmp.replace(path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())
