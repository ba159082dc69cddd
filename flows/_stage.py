"""What every flow shares: params.yaml, the profile, the model/Ray sections, and the standard stage run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.common import REPO_ROOT, config_from_dict, load_yaml, write_json
from components.ray_utils import RayConfig
from model.config import get_config

PARAMS_FILE = REPO_ROOT / "params.yaml"


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
    merged = {**section(params, "ray"), **(params.get(stage, {}) or {}).get("ray", {})}
    return config_from_dict(RayConfig, merged, "ray")


def model_args(params: dict, vocab_size: int):
    model = section(params, "model")
    return get_config(model["config"], vocab_size=vocab_size, **(model.get("overrides") or {}))


def path(p: str) -> Path:
    return REPO_ROOT / p


def write_metrics(name: str, metrics: dict) -> None:
    write_json(path(f"metrics/{name}.json"), metrics)



@dataclass
class LMSection:
    """An LM training section of params.yaml, split: the loop's config, data shaping, and the sampling sub-section."""

    train: object  # LMTrainConfig
    seq_len: int
    val_fraction: float
    sample: object | None  # SampleConfig, for stages that sample the policy
    replay: int  # SFT demonstrations mixed into a self-generated training set, against forgetting
    extra: dict


def lm_section(params: dict, stage: str, extra: tuple[str, ...] = ()) -> LMSection:
    from components.lm_train import LMTrainConfig
    from components.sampling import SampleConfig

    cfg = dict(section(params, stage))
    cfg.pop("ray", None)
    seq_len, val_fraction = cfg.pop("seq_len"), cfg.pop("val_fraction")
    sample, replay = cfg.pop("sample", None), cfg.pop("replay", 0)
    extras = {k: cfg.pop(k) for k in extra}
    return LMSection(config_from_dict(LMTrainConfig, cfg, stage), seq_len, val_fraction,
                     None if sample is None else config_from_dict(SampleConfig, sample, f"{stage}.sample"), replay,
                     extras)


def sft_replay(n: int, seed: int) -> list[list[dict]]:
    """n SFT demonstrations drawn without replacement (seeded)."""
    import random

    from components.datasets import messages_column, read_table

    dialogs = messages_column(read_table(path("data/raw/sft.parquet")))
    return random.Random(seed).sample(dialogs, min(n, len(dialogs)))


def write_curves(stage: str, checkpoint: Path) -> None:
    """The training history a checkpoint carries -> plots/curves/<stage>.json (+ <stage>_val.json), for dvc plots."""
    import json

    history = json.loads((checkpoint / "trainer_state" / "history.json").read_text())
    history = [r if "step" in r else {"step": i, **r} for i, r in enumerate(history)]
    train = [r for r in history if not any(k.startswith("val_") for k in r)]
    val = [{"step": r["step"], "val_loss": r["val_loss"]} for r in history if "val_loss" in r]
    write_json(path(f"plots/curves/{stage}.json"), train)
    write_json(path(f"plots/curves/{stage}_val.json"), val)  # [] when too few rows to hold any out (a DVC out)


def finetune(params: dict, stage: str, cfg: LMSection, init: Path, dialogs: list[list[dict]], out: Path,
             run_id: str, last_turn_only: bool = False, extra_metrics: dict | None = None) -> dict:
    """The tail every chat fine-tuning stage shares (sft, rejection, gatt, distill): dialogs in the chat format with
    loss on the assistant tokens (or the last turn only) -> the shared LM loop on Ray Train from `init` -> out,
    metrics, curves."""
    import mlflow

    from components.datasets import examples_data
    from components.lm_train import train_lm
    from model.chat import encode_dialog
    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(init / "tokenizer.model")
    examples = [encode_dialog(tokenizer, d, last_turn_only=last_turn_only) for d in dialogs]
    replay = sft_replay(cfg.replay, cfg.train.seed) if cfg.replay else []
    examples += [encode_dialog(tokenizer, d) for d in replay]
    train, val, stats = examples_data(examples, tokenizer.pad_id, cfg.seq_len, cfg.val_fraction, cfg.train.seed)
    stats["replayed_sft"] = len(replay)
    print(f"[{stage}] {stats}")
    metrics = train_lm({"checkpoint": str(init)}, train, val, cfg.train, ray_config(params, stage), stage, out,
                       run_id)
    metrics.update(stats, **(extra_metrics or {}))
    mlflow.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    write_metrics(stage, metrics)
    write_curves(stage, out)
    return metrics
