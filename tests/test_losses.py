"""Exact values of the RLHF losses on small hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from components.rlhf.losses import (RATING_MARGINS, RATINGS, entropy_from_logits, explained_variance, gae,
                                    last_token_index, logit, logprobs_from_logits, margins_tensor, masked_mean,
                                    piecewise_reward, ppo_policy_loss, ppo_rewards, ppo_value_loss, rating_margins,
                                    reward_margin_loss, whiten)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


def test_rating_margins_are_the_papers():
    assert RATING_MARGINS["small"] == {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3,
                                       "negligibly_better": 0.0}
    assert RATING_MARGINS["large"] == {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0,
                                       "negligibly_better": 0.0}
    assert rating_margins() == RATING_MARGINS["small"]
    with pytest.raises(ValueError, match="margin scale"):
        rating_margins("huge")


@pytest.mark.parametrize("scale", ["small", "large", "none"])
@pytest.mark.parametrize("rating", RATINGS)
def test_margin_loss_per_rating(scale, rating):
    # r(chosen) - r(rejected) = 1, so the loss is -log sigmoid(1 - m) = log(1 + e^(m - 1)).
    m = RATING_MARGINS[scale][rating]
    margin = margins_tensor([rating], RATING_MARGINS[scale])
    close(reward_margin_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin), math.log1p(math.exp(m - 1)))


def test_margin_loss_batch_mean_and_unrated_pairs():
    margins = margins_tensor(["significantly_better", None, "better"], rating_margins("large"))
    close(margins, [3.0, 0.0, 2.0])
    loss = reward_margin_loss(torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.0, 0.0, 1.0]), margins)
    close(loss, (math.log1p(math.exp(3)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(0))) / 3)
    with pytest.raises(ValueError, match="no margin"):
        margins_tensor(["better"], {"significantly_better": 1.0})
    close(margins_tensor(["better"], None), [0.0])


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    close(masked_mean(x, mask), 2.5)
    close(masked_mean(x, mask, dim=1), [1.5, 3.5])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not NaN


def test_whiten():
    # mean 2.5, unbiased variance 5/3.
    std = math.sqrt(5 / 3)
    expected = [(v - 2.5) / std for v in (1, 2, 3, 4)]
    close(whiten(torch.tensor([1.0, 2.0, 3.0, 4.0])), expected, atol=1e-5)
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = whiten(x, mask)
    close(out[mask.bool()], expected, atol=1e-5)  # padding does not move the statistics
    close(whiten(x, mask, shift_mean=False)[mask.bool()], [v + 2.5 for v in expected], atol=1e-5)
    close(whiten(torch.tensor([3.0])), [0.0])  # a single value: no NaN


def test_logprobs_and_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, -1e4]]])  # (1, 2, 4)
    tokens = torch.tensor([[2, 0]])
    close(logprobs_from_logits(logits, tokens), [[math.log(1 / 4), math.log(3 / 5)]])
    # uniform over 4: log 4; (3/5, 1/5, 1/5, 0): -(0.6 ln 0.6 + 2 * 0.2 ln 0.2)
    close(entropy_from_logits(logits), [[math.log(4), -(0.6 * math.log(0.6) + 0.4 * math.log(0.2))]], atol=1e-5)
    random_logits = torch.randn(2, 3, 7)
    random_tokens = torch.randint(0, 7, (2, 3))
    close(logprobs_from_logits(random_logits, random_tokens),
          torch.log_softmax(random_logits, -1).gather(-1, random_tokens[..., None]).squeeze(-1), atol=1e-5)


def test_gae_hand_computed():
    # gamma 1, lam 0.5: deltas (0, 0, 0.5) -> advantages (0.125, 0.25, 0.5); returns = advantages + values.
    advantages, returns = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]),
                              torch.ones(1, 3), gamma=1.0, lam=0.5)
    close(advantages, [[0.125, 0.25, 0.5]])
    close(returns, [[0.625, 0.75, 1.0]])
    # A padded row: the value after the last real token is 0, padding rewards/values are ignored.
    # delta1 = 1 - 0.4 = 0.6; delta0 = 0.9 * 0.4 - 0.2 = 0.16; adv0 = 0.16 + 0.9 * 0.8 * 0.6 = 0.592.
    advantages, returns = gae(torch.tensor([[0.0, 1.0, 9.0]]), torch.tensor([[0.2, 0.4, 7.0]]),
                              torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.9, lam=0.8)
    close(advantages, [[0.592, 0.6, 0.0]])
    close(returns, [[0.792, 1.0, 0.0]])


def reference_gae(rewards, values, lengths, gamma, lam):
    """The textbook loop, one row at a time over its real tokens only."""
    advantages = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            advantages[b, t] = running
    returns = torch.where(advantages != 0, advantages + values, torch.zeros_like(values))
    return advantages, returns


def test_gae_matches_reference_loop():
    torch.manual_seed(0)
    lengths = [5, 1, 3, 4]
    rewards, values = torch.randn(4, 5), torch.randn(4, 5)
    mask = (torch.arange(5)[None] < torch.tensor(lengths)[:, None]).float()
    advantages, returns = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    ref_advantages, ref_returns = reference_gae(rewards, values, lengths, 0.99, 0.95)
    close(advantages, ref_advantages, atol=1e-5)
    close(returns, ref_returns, atol=1e-5)


def test_ppo_policy_loss_clipping():
    # ratio, advantage -> per-token max(-A r, -A clip(r)):
    # (1.5, +1) -> -1.2 clipped; (0.5, +1) -> -0.5; (1.1, -1) -> 1.1; (1.0, +2) -> -2; (0.5, -1) -> 0.8 clipped.
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.0, 0.5, 9.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, 2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    loss, clip_fraction = ppo_policy_loss(ratios.log(), torch.zeros_like(ratios), advantages, mask, cliprange=0.2)
    close(loss, (-1.2 - 0.5 + 1.1 - 2.0 + 0.8) / 5)
    close(clip_fraction, 2 / 5)


def test_ppo_policy_loss_gradient_is_zero_where_clipped():
    logprobs = torch.tensor([[math.log(1.5), math.log(1.0)]], requires_grad=True)
    loss, _ = ppo_policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2))
    loss.backward()
    close(logprobs.grad, [[0.0, -0.5]])  # d/dlogp of -A r / 2 at r = 1 is -0.5


def test_ppo_value_loss_clipping():
    # v = (0.5, 0.1, -0.5), old 0, clip 0.2 -> v_clip = (0.2, 0.1, -0.2); returns (1, 1, 0)
    # max((v - G)^2, (v_clip - G)^2) = (max(.25, .64), .81, max(.25, .04)) = (.64, .81, .25)
    values, returns = torch.tensor([[0.5, 0.1, -0.5, 3.0]]), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clip_fraction = ppo_value_loss(values, torch.zeros_like(values), returns, mask, cliprange_value=0.2)
    close(loss, 0.5 * (0.64 + 0.81 + 0.25) / 3)
    close(clip_fraction, 1 / 3)


def test_piecewise_reward_branches():
    r_helpful = torch.tensor([0.9, 0.9, 0.9, 0.9])
    r_safety = torch.tensor([0.8, 0.1, 0.6, 0.15])
    is_safety = torch.tensor([True, False, False, False])
    # safety prompt -> safety; unsafe answer (0.1 < 0.15) -> safety; otherwise helpful (0.15 is not below 0.15).
    close(piecewise_reward(r_helpful, r_safety, is_safety, threshold=0.15), [0.8, 0.1, 0.9, 0.9])


def test_logit_is_clamped():
    close(logit(torch.tensor([0.5, torch.sigmoid(torch.tensor(2.0)).item()])), [0.0, 2.0], atol=1e-5)
    saturated = logit(torch.tensor([0.0, 1.0]), eps=1e-6)
    assert torch.isfinite(saturated).all()
    close(saturated, [math.log(1e-6 / (1 - 1e-6)), math.log((1 - 1e-6) / 1e-6)], atol=2e-2)  # fp32 1 - 1e-6


def test_ppo_rewards_kl_per_token_and_score_at_last_token():
    r_c = torch.sigmoid(torch.tensor([0.0, 2.0]))  # logits 0 and 2
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref_logprobs = torch.tensor([[-2.0, -2.0, -1.0], [-0.5, -1.5, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # lengths 3 and 2
    close(last_token_index(mask), [2, 1])
    beta = 0.1
    rewards = ppo_rewards(r_c, logprobs, ref_logprobs, mask, beta, whiten_scores=False)
    # -beta * (lp - ref): row 0 (-0.1, 0, -0.05) + score 0 at t=2; row 1 (0.05, -0.05, 0) + score 2 at t=1
    close(rewards, [[-0.1, 0.0, -0.05], [0.05, -0.05 + 2.0, 0.0]], atol=1e-5)
    whitened = ppo_rewards(r_c, logprobs, ref_logprobs, mask, beta, whiten_scores=True)
    # scores (0, 2) whitened: mean 1, unbiased std sqrt(2) -> (-1/sqrt2, +1/sqrt2)
    s = 1 / math.sqrt(2)
    close(whitened, [[-0.1, 0.0, -0.05 - s], [0.05, -0.05 + s, 0.0]], atol=1e-5)


def test_logprobs_are_fp32_even_from_bf16_logits_under_autocast():
    logits = torch.randn(2, 3, 50) * 4
    tokens = torch.randint(0, 50, (2, 3))
    exact = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs = logprobs_from_logits(logits, tokens)
        entropy = entropy_from_logits(logits)
    assert logprobs.dtype == entropy.dtype == torch.float32
    close(logprobs, exact.float(), atol=1e-5)  # a bf16 log-softmax is off by ~1e-2 at these magnitudes


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 0.0], [3.0, 5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    close(explained_variance(returns, returns, mask), 1.0)  # perfect values
    close(explained_variance(torch.full_like(returns, 7.0), returns, mask), 0.0)  # a constant: no better than mean
    values = torch.tensor([[2.0, 1.0, 9.0], [3.0, 5.0, -9.0]])  # padding never counts
    residual, valid = torch.tensor([-1.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, 3.0, 5.0])
    close(explained_variance(values, returns, mask), 1 - residual.var() / valid.var())
    close(explained_variance(values, torch.ones_like(returns), mask), 0.0)  # returns that do not vary


def test_ppo_rewards_truncation_penalty_replaces_the_score_and_leaves_whitening_to_the_rest():
    r_c = torch.tensor([0.2, 0.5, 0.8, 0.99])
    zeros, mask = torch.zeros(4, 2), torch.ones(4, 2)
    truncated = torch.tensor([False, False, False, True])
    rewards = ppo_rewards(r_c, zeros, zeros, mask, 0.1, truncated=truncated, truncation_penalty=-2.0)
    close(rewards[:3, 1], whiten(logit(r_c[:3])))  # whitened over the finished rows alone
    assert rewards[3, 1].item() == -2.0 and not rewards[:, 0].any()
    unpenalised = ppo_rewards(r_c, zeros, zeros, mask, 0.1, truncated=truncated, truncation_penalty=None)
    close(unpenalised[:, 1], whiten(logit(r_c)))  # no penalty: today's rewards
