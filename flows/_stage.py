"""What every flow shares: params.yaml, the profile, the model/Ray sections, and the standard stage run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import TypeVar

from components.common import REPO_ROOT, config_from_dict, load_yaml, write_json
from components.cluster import RayConfig

PARAMS_FILE = REPO_ROOT / "params.yaml"
T = TypeVar("T")
ROUND_KEYS = ("rounds", "final")  # rlhf's keys that name the iterative rounds (read by rlhf_rounds), not config fields


def load_params() -> dict:
    if not PARAMS_FILE.is_file():
        raise SystemExit(f"error: {PARAMS_FILE} is missing")
    return load_yaml(PARAMS_FILE.read_text()) or {}


def section(params: dict, name: str) -> dict:
    if name not in params:
        raise SystemExit(f"error: params.yaml has no {name!r} section")
    return params[name] or {}


def ray_config(params: dict, stage: str) -> RayConfig:
    """The shared `ray` section, with per-stage overrides under <stage>.ray."""
    shared = config_from_dict(RayConfig, section(params, "ray"), "ray")
    return config_from_dict(RayConfig, {**asdict(shared), **((params.get(stage) or {}).get("ray") or {})},
                            f"{stage}.ray")


def stage_config(params: dict, name: str, cls: type[T], nested: tuple[str, ...] = (),
                 flat: tuple[str, ...] = ()) -> T:
    """A stage's one config, parsed from params section `name` by the one parser: its `ray` field is the shared
    `ray` section with <name>.ray's overrides; each `nested` section is the field of that name (e.g. `model`); each
    `flat` section's keys are fields too (e.g. rlhf.safety_threshold: one value for every stage that reads it). The
    stage's own section may not set what a shared section sets. A mistake exits naming the section and key."""
    try:
        data, known = dict(section(params, name)), {f.name for f in fields(cls)}
        for shared in nested + flat:
            flat_part = {k: v for k, v in section(params, shared).items() if k not in ROUND_KEYS}
            keys = [shared] if shared in nested else list(flat_part)
            if clash := sorted(set(keys) & set(data)):
                raise ValueError(f"params section {name!r}: {clash} set in section {shared!r}, not here")
            if unknown := sorted(set(keys) - known):
                raise ValueError(f"unknown keys {unknown} in params section {shared!r}")
            data.update({shared: section(params, shared)} if shared in nested else flat_part)
        if "ray" in known:
            data["ray"] = ray_config(params, name)
        return config_from_dict(cls, data, name)
    except ValueError as e:  # a params mistake: what and where, without a traceback
        raise SystemExit(f"error: {e}") from None


def rlhf_rounds(params: dict) -> dict[str, str]:
    """rlhf.rounds, checked: {round: the policy it samples and starts from}, in round order (dict order, as DVC's
    foreach runs them); rlhf.final must be the last round (GAtt's input)."""
    rlhf = section(params, "rlhf")
    rounds, final = rlhf.get("rounds"), rlhf.get("final")
    if not isinstance(rounds, dict) or not rounds:
        raise SystemExit(f"error: params rlhf.rounds must map round names to {{policy: <checkpoint>}}, got {rounds!r}")
    for name, spec in rounds.items():
        if not (isinstance(name, str) and name.isidentifier()):
            raise SystemExit(f"error: params rlhf.rounds: round name {name!r} must be a plain identifier (e.g. r1)")
        if not isinstance(spec, dict) or set(spec) != {"policy"} or not isinstance(spec["policy"], str):
            raise SystemExit(f"error: params rlhf.rounds.{name} must be {{policy: <checkpoint folder>}}, got {spec!r}")
    if final != list(rounds)[-1]:
        raise SystemExit(f"error: params rlhf.final is {final!r}; it must be the last round of rlhf.rounds "
                         f"({list(rounds)[-1]!r})")
    return {name: spec["policy"] for name, spec in rounds.items()}


def rlhf_round(params: dict, name: str) -> tuple[Path, list[str]]:
    """A round's policy folder and the rounds before it (in order): what a round's stage reads."""
    rounds = rlhf_rounds(params)
    if name not in rounds:
        raise SystemExit(f"error: no round {name!r} in params rlhf.rounds ({', '.join(rounds)})")
    names = list(rounds)
    return path(rounds[name]), names[:names.index(name)]


def round_arg(argv: list[str] | None = None) -> str:
    """The round a per-round stage runs (`python -m flows.<stage> <round>`, DVC's foreach ${key})."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m flows.<stage> <round> (a key of params rlhf.rounds)")
    return argv[0]


def final_round(params: dict) -> str:
    return list(rlhf_rounds(params))[-1]


def path(p: str) -> Path:
    return REPO_ROOT / p


def write_metrics(name: str, metrics: dict) -> None:
    write_json(path(f"metrics/{name}.json"), metrics)


HELD_OUT_PREFIXES = ("val_", "heldout_")  # a history's held-out metrics (val_loss, val_accuracy, heldout_reward, ...)


def curves(history: list[dict]) -> tuple[list[dict], list[dict]]:
    """A training history's rows -> (training curves, held-out curves) by step. DVC plots a file only if every row
    has the same keys (else it drops the file's plots with a warning), so each list has every key of its rows in every
    row, null where a step has no value (a gap in the plot)."""
    held_out = lambda key: key.startswith(HELD_OUT_PREFIXES)  # noqa: E731
    history = [r if "step" in r else {"step": i, **r} for i, r in enumerate(history)]
    train = [{k: v for k, v in r.items() if not held_out(k)} for r in history if any(
        k != "step" and not held_out(k) for k in r)]
    val = [{"step": r["step"], **{k: v for k, v in r.items() if held_out(k)}} for r in history if any(map(held_out, r))]
    return _same_keys(train), _same_keys(val)


def _same_keys(rows: list[dict]) -> list[dict]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def write_curves(stage: str, checkpoint: Path) -> None:
    """The training history a checkpoint carries -> plots/curves/<stage>.json (+ <stage>_val.json), for dvc plots."""
    import json

    train, val = curves(json.loads((checkpoint / "trainer_state" / "history.json").read_text()))
    write_json(path(f"plots/curves/{stage}.json"), train)
    write_json(path(f"plots/curves/{stage}_val.json"), val)  # [] when nothing was held out (a DVC out)


def finish_stage(stage: str, metrics: dict, checkpoint: Path | None = None) -> None:
    """How every training stage ends: its final metrics to MLflow (final_*) and metrics/<stage>.json, and the curves
    its checkpoint carries to plots/curves/ (dvc plots); a round's stage in its round's folder (files_name)."""
    import mlflow

    mlflow.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    write_metrics(files_name(stage), metrics)
    if checkpoint is not None:
        write_curves(files_name(stage), checkpoint)


def run_stage(main: Callable[[], object]) -> None:
    """A stage script's entry point: main(), then leave without the interpreter's teardown. With torch, Ray and MLflow
    loaded, freeing every module at exit takes 1.5-2.5 s of CPU on 2 cores, once per stage, for nothing: main() has
    ended the MLflow run and written every output by then. Ray is left cleanly (its atexit would do the same). An
    exception propagates and takes the normal exit, traceback and status included."""
    import logging
    import os
    import sys

    main()
    ray = sys.modules.get("ray")  # a stage that never imported Ray does not pay for importing it here
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def files_name(stage: str) -> str:
    """Where a stage's metrics and curves go under metrics/ and plots/curves/: a round's stage (DVC's
    `<stage>@<round>`) in its round's folder, <round>/<stage>."""
    base, _, rnd = stage.partition("@")
    return f"{rnd}/{base}" if rnd else stage
