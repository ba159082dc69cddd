"""What every flow shares: params.yaml, the profile, the model/Ray sections, and the standard stage run."""

from __future__ import annotations

from pathlib import Path

import yaml

from components.common import REPO_ROOT, config_from_dict, write_json
from components.ray_utils import RayConfig
from model.config import get_config

PARAMS_FILE = REPO_ROOT / "params.yaml"


def load_params() -> dict:
    if not PARAMS_FILE.is_file():
        raise SystemExit(f"error: {PARAMS_FILE} is missing")
    return yaml.safe_load(PARAMS_FILE.read_text()) or {}


def section(params: dict, name: str) -> dict:
    if name not in params:
        raise SystemExit(f"error: params.yaml has no {name!r} section")
    return params[name] or {}


def ray_config(params: dict, stage: str) -> RayConfig:
    """The shared `ray` section, with per-stage overrides under <stage>.ray."""
    merged = {**section(params, "ray"), **(params.get(stage, {}) or {}).get("ray", {})}
    return config_from_dict(RayConfig, merged, "ray")


def model_args(params: dict, vocab_size: int):
    model = section(params, "model")
    return get_config(model["config"], vocab_size=vocab_size, **(model.get("overrides") or {}))


def path(p: str) -> Path:
    return REPO_ROOT / p


def write_metrics(name: str, metrics: dict) -> None:
    write_json(path(f"metrics/{name}.json"), metrics)
