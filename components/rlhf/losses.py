"""The RLHF math of Llama 2 (Touvron et al. 2023, §3.2.2–3.2.3) as small, pure tensor functions.

Shapes: B sequences, R response tokens (right-padded), V vocabulary. A `mask` (B, R) is 1.0 on response tokens (the
eos included when the response ended with one) and 0.0 on padding. No module state, no distributed calls: a
statistic that must span data-parallel ranks takes `reduce` (a tensor -> its sum over ranks) or `num_tokens` from the
caller; without them everything is local to the batch given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

# Preference rating levels, strongest first (§3.2.1), and the reward-model margin m(r) of each (§3.2.2, table 28).
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
RATING_MARGINS: dict[str, dict[str, float]] = {
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
    "none": dict.fromkeys(RATINGS, 0.0),  # the plain binary ranking loss (InstructGPT)
}
DEFAULT_MARGIN_SCALE = "small"
Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over data-parallel ranks (all_reduce)


def rating_margins(scale: str = DEFAULT_MARGIN_SCALE) -> dict[str, float]:
    """The margin of each rating level for a margin scale: "small" (default), "large" or "none"."""
    if scale not in RATING_MARGINS:
        raise ValueError(f"unknown margin scale {scale!r}; choose one of {sorted(RATING_MARGINS)}")
    return dict(RATING_MARGINS[scale])


def reward_margin_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       ) -> torch.Tensor:
    """Llama 2's ranking loss -log sigmoid(r(chosen) - r(rejected) - m(r)), averaged; chosen, rejected, margin (B,)."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None,
                reduce: Reduce | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (all of x, or along dim). An empty mask gives 0, not NaN.
    reduce (with dim None): sums a tensor over data-parallel ranks, so the mean is over every rank's positions."""
    if mask is None:
        mask = torch.ones_like(x)
    mask = mask.to(x.dtype)
    if dim is not None:
        return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)
    reduce = reduce or _local
    return reduce((x * mask).sum()) / reduce(mask.sum()).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None, reduce: Reduce | None = None) -> torch.Tensor:
    """Unbiased variance of x over the masked positions (0 when fewer than two); reduce as in masked_mean."""
    mask = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    reduce = reduce or _local
    count = reduce(mask.sum())
    centered = (x - masked_mean(x, mask, reduce=reduce)) * mask
    return reduce((centered ** 2).sum()) / (count - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8,
           reduce: Reduce | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked positions; shift_mean=False keeps the mean (TRL's masked_whiten). reduce:
    the statistics span every data-parallel rank's rows (N workers whiten as one worker would the whole batch).

    Masked-out positions come back as whatever the formula gives; multiply by the mask where that matters.
    """
    mean, var = masked_mean(x, mask, reduce=reduce), masked_var(x, mask, reduce=reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token]: logits (B, R, V), tokens (B, R) -> (B, R) fp32.

    Computed in fp32 outside autocast whatever the logits' dtype: a bf16 log-softmax has ~3 significant digits, and
    PPO's ratio exp(new - old) and the KL penalty are differences of these numbers. gather - logsumexp keeps one
    (B, R, V) tensor alive instead of two (log_softmax would materialise another).
    """
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float()
        return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, in fp32: (B, R, V) -> (B, R). H = logsumexp(z) - sum p z."""
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float()
        return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       reduce: Reduce | None = None) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (every rank's, with reduce): 1 is a perfect
    value model, 0 one no better than a constant, negative worse. 0 when the returns do not vary."""
    var_returns = masked_var(returns, mask, reduce=reduce)
    if float(var_returns) == 0.0:
        return torch.zeros((), device=values.device)
    return 1 - masked_var(returns - values, mask, reduce=reduce) / var_returns


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95,
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses: rewards, values, mask (B, R) -> advantages,
    returns (B, R), both 0 on padding.

    Zeroing values and rewards past each response makes V(s_{T+1}) = 0 after its last token, so one backward pass
    over the padded block handles every length at once.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    R = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float = 0.2, num_tokens: torch.Tensor | float | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, averaged over response tokens; all inputs (B, R).

    num_tokens: what the sum over tokens is divided by (default: this batch's count). Data-parallel ranks pass the
    global count / ranks: the gradients they average are then exactly those of the mean over every rank's tokens.
    Returns the loss and the clip fraction (share of tokens where the clipped term was the active one).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = _token_mean(torch.maximum(loss_unclipped, loss_clipped), mask, num_tokens)
    clip_fraction = _token_mean((loss_clipped > loss_unclipped).float(), mask, num_tokens)
    return loss, clip_fraction.detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   cliprange_value: float = 0.2, num_tokens: torch.Tensor | float | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((V - G)^2, (V_clip - G)^2), V_clip within ±cliprange_value of the old value;
    all inputs (B, R); num_tokens as in ppo_policy_loss. Returns the loss and the value clip fraction."""
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * _token_mean(torch.maximum(loss_unclipped, loss_clipped), mask, num_tokens)
    clip_fraction = _token_mean((loss_clipped > loss_unclipped).float(), mask, num_tokens)
    return loss, clip_fraction.detach()


def _token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor | float | None) -> torch.Tensor:
    if num_tokens is None:
        return masked_mean(x, mask)
    return (x * mask.to(x.dtype)).sum() / num_tokens


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """log(p / (1 - p)) with p clamped to [eps, 1 - eps], so a saturated reward model gives ±13.8, not ±inf."""
    return torch.logit(p, eps=eps)


def piecewise_reward(r_helpful: torch.Tensor, r_safety: torch.Tensor, is_safety_prompt: torch.Tensor,
                     threshold: float) -> torch.Tensor:
    """Llama 2's R_c (§3.2.3): the safety score on safety prompts or when it is below threshold (the paper: 0.15),
    else helpfulness.

    r_helpful, r_safety: (B,) probabilities in (0, 1) (sigmoid of each RM's scalar); is_safety_prompt (B,) bool.
    """
    use_safety = is_safety_prompt.to(torch.bool) | (r_safety < threshold)
    return torch.where(use_safety, r_safety, r_helpful)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last response token in a right-padded mask (B, R) -> (B,) long."""
    return (mask.sum(-1).long() - 1).clamp(min=0)


def ppo_rewards(r_c: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                beta: float, whiten_scores: bool = True, reduce: Reduce | None = None,
                truncated: torch.Tensor | None = None, truncation_penalty: float | None = None) -> torch.Tensor:
    """Per-token rewards R = WHITEN(LOGIT(R_c)) - beta * KL (§3.2.3): (B,), (B, R) x3 -> (B, R).

    The KL term is the per-token sample estimate log pi(y_t) - log pi_0(y_t) (its sum over tokens is the sequence
    KL estimate); the score is added at each row's last response token only. Whitening is over the batch of rows
    (every rank's, with reduce). truncated (B,) bool with a truncation_penalty: those rows (cut at max_new_tokens,
    no eos: the reward models read an unfinished answer) get the penalty as their score instead, on the whitened
    scale, and the whitening statistics are taken over the other rows.
    """
    mask = mask.to(logprobs.dtype)
    rewards = -beta * (logprobs - ref_logprobs) * mask
    score = logit(r_c.to(logprobs.dtype))
    penalise = truncated is not None and truncation_penalty is not None
    if whiten_scores:
        score = whiten(score, (~truncated).to(score.dtype) if penalise else None, reduce=reduce)
    if penalise:
        score = torch.where(truncated, torch.full_like(score, truncation_penalty), score)
    return rewards.scatter_add(1, last_token_index(mask)[:, None], score[:, None])


def margins_tensor(ratings: list[str | None], margins: Mapping[str, float] | None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The margin of each pair (B,) from its rating; 0 for pairs without a rating or when margins is None."""
    if margins is None:
        return torch.zeros(len(ratings), device=device)
    unknown = sorted({r for r in ratings if r is not None and r not in margins})
    if unknown:
        raise ValueError(f"no margin for ratings {unknown}; margins are given for {sorted(margins)}")
    return torch.tensor([0.0 if r is None else float(margins[r]) for r in ratings], device=device)
