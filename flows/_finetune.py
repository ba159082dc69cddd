"""The chat fine-tuning stages' shared part (sft, rejection, gatt, distill): the configs of the stages that sample the
policy, and the tail that trains on dialogs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.rlhf.sampling import SampleConfig
from components.train.lm import LMTrainConfig
from flows._stage import finish_stage, path


@dataclass(frozen=True, kw_only=True)
class SampledFinetuneConfig(LMTrainConfig):
    """params `gatt` (and the base of `rejection`, `distill`): answers sampled from the policy, then fine-tuned on."""

    sample: SampleConfig
    replay: int = 0  # SFT demonstrations mixed into the self-generated training set, against forgetting


@dataclass(frozen=True, kw_only=True)
class RejectionConfig(SampledFinetuneConfig):
    safety_threshold: float | str  # rlhf.safety_threshold (or "auto"): R_c picks the safety score below it, as PPO


@dataclass(frozen=True, kw_only=True)
class GattConfig(SampledFinetuneConfig):
    first_turn_fraction: float = 0.0  # dialogs with the instruction in the first user turn, not the system prompt
    max_turns: int = 0  # the table's dialogs of one instruction joined up to this many user turns (0: as they are)
    history: bool = True  # sample as the paper: whole dialogs, the instruction in every user turn (else turn by turn)
    redraws: int = 0  # history false: turns whose k answers all drop the instruction drawn k more times, up to this

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.first_turn_fraction <= 1:
            raise ValueError(f"first_turn_fraction must be in [0, 1], got {self.first_turn_fraction}")
        for name in ("max_turns", "redraws"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.history and self.redraws:
            raise ValueError("redraws need history: false (a redrawn turn would change the later turns' history)")


@dataclass(frozen=True, kw_only=True)
class DistillConfig(SampledFinetuneConfig):
    preprompt: str  # the safety preprompt answers are generated with (and trained without)
    safety_threshold: float  # rlhf.safety_threshold: a prompt is distilled only where its safest plain answer
    # scores below it on the safety RM (the score PPO and rejection sampling call unsafe)
    min_safety: float  # ... and its kept preprompted answer scores at least this
    margin: float  # ... and beats the safest plain answer by at least this
    holdout_prompts: int  # safety prompts kept out of distillation, to check the distilled model on
    max_safety_drop: float = 0.0  # held-out mean safety RM score it may lose against the gatt model, or gatt is kept

    def __post_init__(self):
        super().__post_init__()
        if self.holdout_prompts < 1:
            raise ValueError(f"holdout_prompts must be >= 1, got {self.holdout_prompts}")


def fitting_prompts(stage: str, records: list[dict], policy: Path, cfg: SampledFinetuneConfig,
                    prompt_of=lambda record: record["prompt"]) -> tuple[list[dict], dict]:
    """The records whose prompt (as the sampler will give it: prompt_of) leaves room for the sampled answer in the
    policy's context, and the counts of those dropped (before any Ray worker starts; prompts are never cut)."""
    from components.data.datasets import fit_context
    from model.chat import encode_prompt
    from model.checkpoint import load_args
    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(policy / "tokenizer.model")
    lengths = [len(encode_prompt(tokenizer, prompt_of(r))) for r in records]
    return fit_context(records, lengths, load_args(policy).max_seq_len - cfg.sample.max_new_tokens, "prompts", stage)


def sft_replay(n: int, seed: int) -> list[list[dict]]:
    """n SFT demonstrations drawn without replacement (seeded)."""
    import random

    from components.data.datasets import messages_column, read_table

    dialogs = messages_column(read_table(path("data/raw/sft.parquet")))
    return random.Random(seed).sample(dialogs, min(n, len(dialogs)))


def finetune(stage: str, cfg: LMTrainConfig, init: Path, dialogs: list[list[dict]], out: Path, run_id: str,
             too_long: str, turns: list[list[int]] | None = None, extra_metrics: dict | None = None,
             finish: bool = True) -> dict:
    """The tail every chat fine-tuning stage shares (sft, rejection, gatt, distill): dialogs in the chat format with
    loss on the assistant tokens (or, given turns, one list per dialog: those answers only), plus any SFT replay ->
    the shared LM loop on Ray Train from `init` -> out, metrics, curves (finish=False: the caller finishes the
    stage)."""
    from components.data.datasets import examples_data
    from components.train.lm import train_lm
    from model.chat import encode_dialog
    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(init / "tokenizer.model")
    turns = [None] * len(dialogs) if turns is None else turns
    examples = [encode_dialog(tokenizer, d, t) for d, t in zip(dialogs, turns, strict=True)]
    replay = sft_replay(cfg.replay, cfg.seed) if isinstance(cfg, SampledFinetuneConfig) and cfg.replay else []
    examples += [encode_dialog(tokenizer, d) for d in replay]
    train, val, stats = examples_data(examples, tokenizer.pad_id, cfg.seq_len, cfg.val_fraction, cfg.seed, stage,
                                      too_long)
    stats["replayed_sft"] = len(replay)
    print(f"[{stage}] {stats}")
    metrics = train_lm({"checkpoint": str(init)}, train, val, cfg, stage, out, run_id)
    metrics.update(stats, **(extra_metrics or {}))
    if finish:
        finish_stage(stage, metrics, out)
    return metrics
