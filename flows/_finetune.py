"""The chat fine-tuning stages' shared part (sft, rejection, gatt, distill): their params section and the tail that
trains on dialogs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.common import config_from_dict
from flows._stage import finish_stage, path, ray_config, section


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
    from components.train.lm import LMTrainConfig
    from components.rlhf.sampling import SampleConfig

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

    from components.data.datasets import messages_column, read_table

    dialogs = messages_column(read_table(path("data/raw/sft.parquet")))
    return random.Random(seed).sample(dialogs, min(n, len(dialogs)))


def finetune(params: dict, stage: str, cfg: LMSection, init: Path, dialogs: list[list[dict]], out: Path,
             run_id: str, last_turn_only: bool = False, extra_metrics: dict | None = None) -> dict:
    """The tail every chat fine-tuning stage shares (sft, rejection, gatt, distill): dialogs in the chat format with
    loss on the assistant tokens (or the last turn only) -> the shared LM loop on Ray Train from `init` -> out,
    metrics, curves."""
    from components.data.datasets import examples_data
    from components.train.lm import train_lm
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
    finish_stage(stage, metrics, out)
    return metrics
