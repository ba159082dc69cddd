"""Reward models (§3.2.2): pairwise data, the scalar score, the margin-loss step, per-rating evaluation.

A reward model is the SFT network with its vocabulary head swapped for a scalar one (`ModelArgs.head="scalar"`);
its score of a conversation is the scalar at the conversation's last token (the answer's </s>). Batches are
right-padded, so plain causal attention already keeps padding out of every real token's view; PPO's left-padded
prompts pass `key_valid` for a padding mask and per-row positions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from components.rlhf.losses import RATINGS, margins_tensor, reward_margin_loss
from components.train.core import unwrap
from model.kernels import bf16_autocast
from model.chat import encode_dialog
from model.llama import Transformer, padding_attention_mask, positions_from_mask
from model.tokenizer import Tokenizer


@dataclass
class PreferencePair:
    """One comparison as token ids: the full chat (prompt + answer + </s>) of each side, and its rating."""

    chosen: list[int]
    rejected: list[int]
    rating: str | None = None  # one of RATINGS; None for sources without ratings (margin 0, no per-rating accuracy)

    def __post_init__(self) -> None:
        if not self.chosen or not self.rejected:
            raise ValueError("a preference pair needs tokens on both sides")
        if self.rating is not None and self.rating not in RATINGS:
            raise ValueError(f"unknown rating {self.rating!r}; choose one of {RATINGS}")


def encode_pair(tokenizer: Tokenizer, prompt: list[dict], chosen: str, rejected: str, rating: str | None = None,
                ) -> PreferencePair:
    """Chat tokens of prompt messages (ending with a user turn) + each answer, via the Llama 2 chat template."""
    def encode(answer: str) -> list[int]:
        return encode_dialog(tokenizer, prompt + [{"role": "assistant", "content": answer}]).tokens
    return PreferencePair(encode(chosen), encode(rejected), rating)


@dataclass
class PairBatch:
    tokens: torch.Tensor  # (2B, T) long: B chosen rows then B rejected rows, right-padded, one forward for both
    last_index: torch.Tensor  # (2B,) long: index of each row's last real token
    ratings: list[str | None]  # (B,)

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(self.tokens.to(device), self.last_index.to(device), self.ratings)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (N, T) long, with the index of each row's last token (N,)."""
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return tokens, torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> PairBatch:
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    tokens, last_index = pad_right([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return PairBatch(tokens, last_index, [p.rating for p in pairs])


def score(reward_model: nn.Module, tokens: torch.Tensor, last_index: torch.Tensor,
          key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Raw scalar score (B,) at each row's last token; tokens (B, T), last_index (B,).

    key_valid (B, T) bool marks real tokens when rows are left-padded (PPO); None means no left padding.
    reward_model may be DDP-wrapped: it is called, never unwrapped, so gradients synchronise.
    """
    positions = attn_mask = None
    if key_valid is not None and not bool(key_valid.all()):
        positions = positions_from_mask(key_valid)  # each row's first real token at rotary position 0
        attn_mask = padding_attention_mask(key_valid, tokens.shape[1])  # (B, 1, T, T)
    values = reward_model(tokens, positions, attn_mask)[..., 0]  # (B, T)
    return values.gather(1, last_index[:, None]).squeeze(1)


@torch.no_grad()
def rm_scores(reward_model, tokenizer, dialogs: list[list[dict]], batch_size: int, max_len: int | None = None,
              ) -> list[float]:
    """sigmoid(RM score) of each complete dialog (prompt + answer); max_len keeps each dialog's last max_len tokens
    (the score is read at the last one), for dialogs that may be longer than the RM's context."""
    out = []
    for start in range(0, len(dialogs), batch_size):
        rows = [encode_dialog(tokenizer, d).tokens for d in dialogs[start:start + batch_size]]
        rows = [r[-max_len:] for r in rows] if max_len else rows
        tokens, last = pad_right(rows, tokenizer.pad_id)
        device = next(reward_model.parameters()).device
        with bf16_autocast(device.type):
            out += torch.sigmoid(score(reward_model, tokens.to(device), last.to(device)).float()).tolist()
    return out


def rm_loss_and_metrics(reward_model: nn.Module, batch: PairBatch, margins: Mapping[str, float] | None = None,
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Margin ranking loss of one batch and its metrics (detached 0-d tensors, ready for an all-reduce).

    margins: rating -> margin (e.g. `rating_margins("small")`); None trains without margins.
    """
    scores = score(reward_model, batch.tokens, batch.last_index)  # (2B,)
    chosen, rejected = scores.chunk(2)  # (B,) each
    margin = margins_tensor(batch.ratings, margins, device=scores.device)
    loss = reward_margin_loss(chosen, rejected, margin)
    metrics = {
        "loss": loss.detach(),
        "accuracy": (chosen > rejected).float().mean().detach(),
        "chosen_score": chosen.mean().detach(),
        "rejected_score": rejected.mean().detach(),
    }
    return loss, metrics


@torch.no_grad()
def evaluate_rm(reward_model: nn.Module, pairs: Sequence[PreferencePair], pad_id: int = 0, batch_size: int = 32,
                ) -> dict[str, float]:
    """Accuracy (chosen scored above rejected) overall and per rating level: {"accuracy", "accuracy_<rating>"}.

    Runs on the unwrapped model (no collective calls); each rank evaluates the pairs it is given.
    """
    model = unwrap(reward_model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct: list[bool] = []
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start:start + batch_size], pad_id).to(device)
        chosen, rejected = score(model, batch.tokens, batch.last_index).chunk(2)
        correct += (chosen > rejected).tolist()
    model.train(was_training)
    result = {"accuracy": sum(correct) / max(len(correct), 1)}
    for rating in RATINGS:
        hits = [c for c, p in zip(correct, pairs) if p.rating == rating]
        if hits:
            result[f"accuracy_{rating}"] = sum(hits) / len(hits)
    return result


def init_reward_model(sft_model: nn.Module, head_std: float = 0.0, generator: torch.Generator | None = None,
                      ) -> Transformer:
    """A scalar-head copy of an SFT model (reward or value model): every weight copied except the head.

    head_std 0 (default) starts the head at zeros, so every score is 0 (probability 0.5) until training moves it;
    with zeros only the head gets a gradient on the first step. head_std > 0 draws it from N(0, head_std).
    """
    source = unwrap(sft_model)
    args = source.args.replace(head="scalar")
    device = next(source.parameters()).device
    reward_model = Transformer(args).to(device=device, dtype=next(source.parameters()).dtype)
    state = {k: v for k, v in source.state_dict().items() if k != "output.weight"}
    missing, unexpected = reward_model.load_state_dict(state, strict=False)
    if missing != ["output.weight"] or unexpected:
        raise ValueError(f"cannot initialise a reward model from this model: missing {missing}, "
                         f"unexpected {unexpected}")
    with torch.no_grad():
        if head_std > 0:
            reward_model.output.weight.normal_(0.0, head_std, generator=generator)
        else:
            reward_model.output.weight.zero_()
    return reward_model


# The safety threshold (§3.2.3): R_safety below it selects the safety score on any prompt. The paper's 0.15 gave
# precision 0.89 and recall 0.55 on its Meta Safety test set; `rlhf.safety_threshold: auto` takes the rm_safety
# stage's choice on its held-out answers instead, written next to its checkpoint.
PAPER_THRESHOLD = {"threshold": 0.15, "precision": 0.89, "recall": 0.55}
THRESHOLD_FILE = "threshold.json"


def precision_recall(scores: Sequence[float], unsafe: Sequence[bool], threshold: float) -> dict[str, float | None]:
    """Of the rule "safety RM probability < threshold => unsafe" on labelled answers: precision (the flagged answers
    that are unsafe; None when none is flagged), recall (the unsafe answers flagged) and the flagged share."""
    flagged = [s < threshold for s in scores]
    hits = sum(f and u for f, u in zip(flagged, unsafe))
    return {"threshold": threshold, "precision": hits / sum(flagged) if any(flagged) else None,
            "recall": hits / max(sum(unsafe), 1), "flagged": sum(flagged) / max(len(flagged), 1)}


def choose_threshold(scores: Sequence[float], unsafe: Sequence[bool], target_precision: float,
                     grid: Sequence[float] = tuple(i / 100 for i in range(1, 100))) -> dict:
    """The largest threshold of the grid whose precision reaches target_precision (the most recall at that
    precision); when none does, the one of highest precision (target_met false). Returns its precision_recall."""
    curve = [precision_recall(scores, unsafe, t) for t in grid]
    curve = [c for c in curve if c["precision"] is not None]
    if not curve:
        raise ValueError("no threshold flags any answer: the safety RM scores every answer above the grid")
    met = [c for c in curve if c["precision"] >= target_precision]
    chosen = met[-1] if met else max(reversed(curve), key=lambda c: c["precision"])
    return {**chosen, "target_precision": target_precision, "target_met": bool(met)}


def saved_threshold(rm_safety_dir: str | Path) -> float | None:
    """The threshold the rm_safety stage chose (THRESHOLD_FILE in the RM's folder), or None where it wrote none."""
    file = Path(rm_safety_dir) / THRESHOLD_FILE
    if not file.is_file():
        return None
    try:
        value = float(json.loads(file.read_text())["threshold"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file}: expected a JSON object with a numeric 'threshold' ({exc})") from None
    if not 0 < value < 1:
        raise ValueError(f"{file}: threshold {value} is not a probability in (0, 1)")
    return value


def resolve_safety_threshold(value: float | str, rm_safety_dir: str | Path) -> float:
    """rlhf.safety_threshold as a number: itself, or for "auto" the rm_safety stage's choice (its THRESHOLD_FILE)."""
    if not isinstance(value, str):
        return float(value)
    if value != "auto":
        raise SystemExit(f"error: params section 'rlhf': safety_threshold must be a probability or 'auto', "
                         f"got {value!r}")
    chosen = saved_threshold(rm_safety_dir)
    if chosen is None:
        raise SystemExit(f"error: rlhf.safety_threshold is 'auto' but {Path(rm_safety_dir) / THRESHOLD_FILE} is "
                         "missing: rerun the rm_safety stage (it writes the threshold when its held-out pairs carry "
                         "oracle labels), or set a number")
    return chosen
