"""PPO for Llama 2 (§3.2.3) in plain PyTorch: a config and a trainer whose `step` reads top to bottom in phases.

    1 rollout      sample responses with the shared decoding path (model.generation.generate)
    2 score        both frozen reward models on prompt + response -> probabilities; R_c by the piecewise rule
    3 forward      old log-probs, reference log-probs and old values, recomputed with one full forward each
    4 rewards      R = WHITEN(LOGIT(R_c)) at the last token - kl_coef * (log pi - log pi_0) at every token
    5 advantages   GAE over the response tokens; advantages whitened
    6 update       ppo_epochs over shuffled minibatches, ONE optimizer step per minibatch for policy and value

Layout of a rollout: each row is [left padding][prompt][response][right padding]; with P the longest prompt and R the
longest response, tokens are (B, P + R) and every per-token tensor is (B, R) over the response. The output at
position P - 1 + t predicts response token t, so logits and values are read from positions [P - 1, P + R - 1).
A response that ended with eos keeps its eos (it is a real action, and the token the reward model reads).

Distributed use (Ray Train workers, components/train/ppo.py): the batch sizes are global, as the LM loop's; each
rank rolls out and trains on its share of the rows, and the statistics that span the batch (score and advantage
whitening, the token count that losses are averaged by) are summed over ranks, so N workers compute what one worker
would on all the rows (up to the minibatch split: each minibatch takes its rows from every rank's share). Every
model may be DDP-wrapped or FSDP2-sharded; under FSDP every forward is a collective, so every rank runs the same
forwards: the same number of rows, forward batches and minibatches, decoding in lock step or from a gathered copy
(`rollout_model`). Under DDP, no-grad forwards use the inner module (`unwrap`) and need no other rank.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from components.rlhf.losses import (entropy_from_logits, explained_variance, gae, last_token_index, logit,
                                    logprobs_from_logits, masked_mean, piecewise_reward, ppo_policy_loss, ppo_rewards,
                                    ppo_value_loss, whiten)
from components.rlhf.reward import score
from components.train.core import make_optimizer, unwrap
from components.train.parallel import clip_grad_norm
from model.generation import SamplingParams, generate
from model.llama import padding_attention_mask, positions_from_mask


@dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO hyperparameters; defaults are the paper's (§3.2.3) where it gives them. safety_threshold has none: it is
    the one `rlhf.safety_threshold` param that rejection sampling reads too."""

    kl_coef: float = 0.01  # beta of the KL penalty: 0.01 for 7B/13B, 0.005 for 34B/70B
    cliprange: float = 0.2  # PPO ratio clip
    cliprange_value: float = 0.2  # value clip around the rollout's values (TRL's default; not in the paper)
    vf_coef: float = 0.1  # value-loss weight (TRL's default); with a separate value model it only scales its grads
    gamma: float = 1.0  # discount: none within a response
    lam: float = 0.95  # GAE lambda
    ppo_epochs: int = 1  # passes over each rollout (not given in the paper)
    rollout_batch_size: int = 512  # prompts per iteration across all workers (paper: 512)
    mini_batch_size: int = 64  # sequences per optimizer step across all workers, one step per minibatch (paper: 64)
    forward_batch_size: int = 64  # rows per no-grad forward / generate call on one worker in phases 1-3 (memory only)
    lr: float = 1e-6  # constant policy learning rate (paper: 1e-6)
    value_lr: float | None = None  # value-model learning rate; None = lr (a value model started afresh needs more)
    beta1: float = 0.9  # AdamW, as the other training loops
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1  # on matrices only; norms and biases are not decayed
    max_grad_norm: float = 1.0
    max_new_tokens: int = 256
    temperature: float = 1.0  # rollout sampling temperature (the objective and KL stay on the T=1 policy)
    top_p: float = 1.0
    # R_safety below this selects the safety score on any prompt (paper: 0.15); "auto": the rm_safety stage's choice
    # (resolve_safety_threshold), which the trainer needs resolved to a number
    safety_threshold: float | str
    # the score (whitened scale) of a response cut at max_new_tokens without eos, instead of the reward models' score
    # of an unfinished answer; None: scored as any other
    truncation_penalty: float | None = None
    whiten_scores: bool = True  # WHITEN(LOGIT(R_c)) over the rollout batch, as the paper
    whiten_advantages: bool = True
    seed: int | None = 0  # sampling (per global row) and minibatch-order seed

    def __post_init__(self) -> None:
        checks = [
            (self.kl_coef >= 0, "kl_coef must be >= 0"),
            (self.cliprange > 0 and self.cliprange_value > 0, "cliprange and cliprange_value must be > 0"),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]"),
            (self.ppo_epochs >= 1, "ppo_epochs must be >= 1"),
            (self.rollout_batch_size >= 1 and self.forward_batch_size >= 1, "batch sizes must be >= 1"),
            (1 <= self.mini_batch_size <= self.rollout_batch_size,
             "mini_batch_size must be in [1, rollout_batch_size]"),
            (self.lr > 0 and (self.value_lr is None or self.value_lr > 0), "learning rates must be > 0"),
            (self.max_grad_norm > 0, "max_grad_norm must be > 0"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0 and 0 < self.top_p <= 1, "temperature must be >= 0 and top_p in (0, 1]"),
            (self.safety_threshold == "auto" if isinstance(self.safety_threshold, str)
             else 0 <= self.safety_threshold <= 1, "safety_threshold is a probability or 'auto'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid PPOConfig: {message}")


@dataclass
class Experience:
    """One rollout batch with everything phase 6 needs; per-token tensors are (B, R) over the response."""

    tokens: torch.Tensor  # (B, P + R) long
    key_valid: torch.Tensor  # (B, P + R) bool: real (non-padding) tokens
    prompt_len: int  # P
    mask: torch.Tensor  # (B, R) float: 1 on response tokens (eos included)
    logprobs: torch.Tensor  # old policy, recomputed by a full forward
    ref_logprobs: torch.Tensor
    values: torch.Tensor  # old values
    rewards: torch.Tensor
    advantages: torch.Tensor  # whitened when config.whiten_advantages
    returns: torch.Tensor
    r_c: torch.Tensor  # (B,) the piecewise reward, a probability
    r_helpful: torch.Tensor  # (B,)
    r_safety: torch.Tensor  # (B,)
    rollout_logprobs: torch.Tensor  # (B, R) as reported by generate() (temperature-scaled), for diagnostics
    finish_reasons: list[str]

    @property
    def responses(self) -> list[list[int]]:
        lengths = self.mask.sum(-1).long().tolist()
        return [row[self.prompt_len:self.prompt_len + n] for row, n in zip(self.tokens.tolist(), lengths)]


def build_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts + right-padded responses: tokens (B, P+R) long, key_valid (B, P+R) bool, mask (B, R)."""
    P, R = max(len(p) for p in prompts), max(max(len(r) for r in responses), 1)
    B = len(prompts)
    tokens = torch.full((B, P + R), pad_id, dtype=torch.long)
    key_valid = torch.zeros(B, P + R, dtype=torch.bool)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        tokens[i, P - len(prompt):P] = torch.as_tensor(prompt, dtype=torch.long)
        tokens[i, P:P + len(response)] = torch.as_tensor(response, dtype=torch.long)
        key_valid[i, P - len(prompt):P + len(response)] = True
    mask = key_valid[:, P:].float()
    return tokens.to(device), key_valid.to(device), mask.to(device)


def response_outputs(model: nn.Module, tokens: torch.Tensor, key_valid: torch.Tensor, prompt_len: int,
                     ) -> torch.Tensor:
    """The model's outputs at the positions that predict each response token: (B, R, V) logits or (B, R, 1)."""
    positions = attn_mask = None
    if not bool(key_valid.all()):
        positions = positions_from_mask(key_valid)  # a left-padded row decodes as it would alone
        attn_mask = padding_attention_mask(key_valid, tokens.shape[1])  # (B, 1, T, T)
    return model(tokens, positions, attn_mask)[:, prompt_len - 1:-1]


def _window(key_valid: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> tuple[int, int, int]:
    """Columns a group of rows needs: (start, P', R') with tokens[:, start:prompt_len + R'] and mask[:, :R'].

    Groups are cut from the whole rollout, whose padding fits its longest prompt and response; trimming to the
    group's own saves the forward most of that padding.
    """
    start = int(key_valid[:, :prompt_len].any(0).long().argmax())  # first column with a real prompt token
    R = max(int(mask.sum(-1).max()), 1)
    return start, prompt_len - start, R


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def _now(device: torch.device) -> float:
    if device.type == "cuda":  # kernels are asynchronous: wait for them so phase timings are real
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PPOTrainer:
    """Policy and value model trained by PPO against a frozen reference policy and two frozen reward models.

    policy: lm-head Transformer (optionally DDP-wrapped); ref_policy: a frozen copy of the initial policy;
    value_model: scalar-head Transformer (optionally DDP-wrapped): a deepcopy of rm_helpful (InstructGPT's
    choice) or `init_reward_model(sft_model)`;
    rm_helpful, rm_safety: scalar-head reward models whose raw score is a logit (sigmoid -> probability).
    The reference and reward models are frozen here (requires_grad False, eval mode).
    rollout_model: a context manager factory giving the module to decode with (default: the policy's inner module;
    for a sharded policy, parallel.gathered). lockstep: generate()'s `sync`, for decoding through a sharded model.
    """

    def __init__(self, policy: nn.Module, ref_policy: nn.Module, value_model: nn.Module, rm_helpful: nn.Module,
                 rm_safety: nn.Module, eos_id: int, pad_id: int, config: PPOConfig,
                 rollout_model: Callable[[], AbstractContextManager[nn.Module]] | None = None,
                 lockstep: Callable[[bool], bool] | None = None):
        if getattr(unwrap(policy), "args", None) is not None and unwrap(policy).args.head != "lm":
            raise ValueError("the policy needs an lm head")
        if getattr(unwrap(value_model), "args", None) is not None and unwrap(value_model).args.head != "scalar":
            raise ValueError("the value model needs a scalar head (init_reward_model)")
        self.policy, self.ref_policy, self.value_model = policy, ref_policy, value_model
        self.rm_helpful, self.rm_safety = rm_helpful, rm_safety
        self.eos_id, self.pad_id, self.config = eos_id, pad_id, config
        if isinstance(config.safety_threshold, str):
            raise ValueError("PPOTrainer needs a numeric safety_threshold: resolve 'auto' first "
                             "(components.rlhf.reward.resolve_safety_threshold)")
        for frozen in (ref_policy, rm_helpful, rm_safety):
            frozen.requires_grad_(False).eval()
        betas = (config.beta1, config.beta2)
        self.policy_optimizer = make_optimizer(policy, config.lr, config.weight_decay, betas, config.eps)
        self.value_optimizer = make_optimizer(value_model, config.value_lr or config.lr, config.weight_decay, betas,
                                              config.eps)
        self.device = next(unwrap(policy).parameters()).device
        self.global_step = 0  # completed steps: part of the seeds, saved in state_dict for resume
        self.rollout_model = rollout_model or (lambda: contextlib.nullcontext(unwrap(self.policy)))
        self.lockstep = lockstep
        distributed = dist.is_available() and dist.is_initialized()
        self.world, self.rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        if config.rollout_batch_size % self.world or config.mini_batch_size % self.world:
            raise ValueError(f"rollout_batch_size {config.rollout_batch_size} and mini_batch_size "
                             f"{config.mini_batch_size} must divide evenly over {self.world} workers")
        self.local_rollout = config.rollout_batch_size // self.world  # this rank's rows of each iteration
        self.local_minibatch = config.mini_batch_size // self.world
        self.reduce = _sum_over_ranks if self.world > 1 else None

    # ---- the step ----------------------------------------------------------------------------------------------

    def step(self, prompts: list[list[int]], is_safety: list[bool]) -> dict[str, float]:
        """One PPO iteration on a batch of prompts (token ids); returns flat float statistics."""
        if len(prompts) != self.local_rollout:
            # Every rank must take the same number of optimizer steps, or a collective waits forever.
            raise ValueError(f"step got {len(prompts)} prompts; this worker's share of rollout_batch_size "
                             f"{self.config.rollout_batch_size} is {self.local_rollout}")
        start = _now(self.device)
        experience, stats = self.make_experience(prompts, is_safety)
        stats.update(self.update(experience))
        self.global_step += 1
        stats["time_step_s"] = _now(self.device) - start
        return stats

    @torch.no_grad()
    def make_experience(self, prompts: list[list[int]], is_safety: list[bool]) -> tuple[Experience, dict[str, float]]:
        """Phases 1-5: rollout, scores, old/ref log-probs and values, rewards, advantages."""
        if len(prompts) != len(is_safety) or not prompts:
            raise ValueError(f"need one is_safety flag per prompt: {len(prompts)} prompts, {len(is_safety)} flags")
        cfg, device = self.config, self.device
        # No-grad work runs on the inner modules: no DDP hooks, so ranks never wait on each other here.
        policy, value_model, ref_policy = unwrap(self.policy), unwrap(self.value_model), unwrap(self.ref_policy)
        rm_helpful, rm_safety = unwrap(self.rm_helpful), unwrap(self.rm_safety)
        policy.eval()
        value_model.eval()
        t0 = _now(device)

        # 1. Rollout through the shared decoding path, a forward batch at a time, each seeded by its first global row.
        first_row = self.rank * self.local_rollout
        responses, rollout_logprobs, finish_reasons = self._rollout(prompts, lambda i: SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            seed=None if cfg.seed is None else cfg.seed + 1_000_003 * self.global_step + first_row + i))
        t1 = _now(device)

        tokens, key_valid, mask = build_sequences(prompts, responses, self.pad_id, device)
        B, P, R = len(prompts), max(len(p) for p in prompts), mask.shape[1]
        logprobs, ref_logprobs, values = (torch.zeros(B, R, device=device) for _ in range(3))
        raw_helpful, raw_safety = torch.zeros(B, device=device), torch.zeros(B, device=device)

        # 2-3. Scores and full forwards. Old log-probs are recomputed rather than taken from generate(): those are
        # of logits / temperature (a different distribution whenever temperature != 1, and the objective and the
        # KL penalty are on the T=1 policy that is deployed; top-p truncation is not in them either), and even at
        # T=1 the cached incremental decode (bf16 autocast, other kernels on GPU) need not match the batched full
        # forward that phase 6 differentiates. Recomputing with that same forward makes the ratio 1 (up to float
        # noise) on the first minibatch, so clipping reacts only to real policy change. The price at T != 1: the
        # samples come from a tempered policy, a mild off-policy shift that the clipping bounds.
        for i in range(0, B, cfg.forward_batch_size):
            rows = slice(i, i + cfg.forward_batch_size)
            start, p, r = _window(key_valid[rows], mask[rows], P)
            tok, valid = tokens[rows, start:P + r], key_valid[rows, start:P + r]
            response = tok[:, p:]  # (b, r)
            logprobs[rows, :r] = logprobs_from_logits(response_outputs(policy, tok, valid, p), response)
            ref_logprobs[rows, :r] = logprobs_from_logits(response_outputs(ref_policy, tok, valid, p), response)
            values[rows, :r] = response_outputs(value_model, tok, valid, p)[..., 0].float()
            raw_helpful[rows], raw_safety[rows] = self._scores(tok, valid, p, mask[rows, :r], rm_helpful, rm_safety)
        logprobs, values = logprobs * mask, values * mask
        ref_logprobs = ref_logprobs * mask

        # 4. Rewards: R_c from the two RM probabilities, then WHITEN(LOGIT(R_c)) - beta * KL per token.
        r_helpful, r_safety = torch.sigmoid(raw_helpful), torch.sigmoid(raw_safety)
        is_safety_t = torch.tensor(is_safety, dtype=torch.bool, device=device)
        r_c = piecewise_reward(r_helpful, r_safety, is_safety_t, cfg.safety_threshold)
        use_safety = is_safety_t | (r_safety < cfg.safety_threshold)  # (B,) for the stats only
        truncated = torch.tensor([f != "stop" for f in finish_reasons], dtype=torch.bool, device=device)
        rewards = ppo_rewards(r_c, logprobs, ref_logprobs, mask, cfg.kl_coef, cfg.whiten_scores, self.reduce,
                              truncated, cfg.truncation_penalty)

        # 5. Advantages (B, R); returns are the value targets, taken before whitening the advantages.
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        ev = explained_variance(values, returns, mask, self.reduce)  # of the old values: how well V predicted G
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask, reduce=self.reduce) * mask
        t2 = _now(device)

        rollout_lp = torch.zeros(B, R, device=device)
        for row, lp in enumerate(rollout_logprobs):
            rollout_lp[row, :len(lp)] = torch.tensor(lp, device=device)
        experience = Experience(tokens, key_valid, P, mask, logprobs, ref_logprobs, values, rewards, advantages,
                                returns, r_c, r_helpful, r_safety, rollout_lp, finish_reasons)

        kl = ((logprobs - ref_logprobs) * mask).sum(-1)  # (B,) sequence KL estimate
        stats = {
            "reward": r_c.mean().item(),
            "reward_helpful": r_helpful.mean().item(),
            "reward_safety": r_safety.mean().item(),
            "safety_selected": use_safety.float().mean().item(),  # share of rows scored by the safety RM
            # share of rows where the threshold rule fired: R_safety < threshold, so the safety score was the reward
            "safety_rule_rate": (r_safety < cfg.safety_threshold).float().mean().item(),
            "score": logit(r_c).mean().item(),
            "kl": kl.mean().item(),
            "non_score_reward": (-cfg.kl_coef * kl).mean().item(),
            "response_length": mask.sum(-1).mean().item(),
            "stopped_fraction": sum(f == "stop" for f in finish_reasons) / B,
            "truncated_fraction": truncated.float().mean().item(),  # cut at max_new_tokens without eos
            "value_mean": masked_mean(values, mask).item(),
            "explained_variance": ev.item(),
            "return_mean": masked_mean(returns, mask).item(),
            "time_rollout_s": t1 - t0,
            "time_experience_s": t2 - t1,
        }
        if cfg.temperature in (0.0, 1.0):  # then generate()'s log-probs are of the T=1 policy: a mask/alignment check
            stats["rollout_logprob_error"] = masked_mean((rollout_lp - logprobs).abs(), mask).item()
        return experience, stats

    def _rollout(self, prompts: list[list[int]], params: Callable[[int], SamplingParams],
                 ) -> tuple[list[list[int]], list[list[float]], list[str]]:
        """Decode prompts a forward batch at a time (params(i): the sampling of the batch starting at row i):
        responses, their log-probs and finish reasons."""
        responses, logprobs, finish_reasons = [], [], []
        with self.rollout_model() as decoder:
            for i in range(0, len(prompts), self.config.forward_batch_size):
                out = generate(decoder, prompts[i:i + self.config.forward_batch_size], params(i), self.eos_id,
                               self.pad_id, sync=self.lockstep)
                responses += out.tokens
                logprobs += out.logprobs
                finish_reasons += out.finish_reasons
        return responses, logprobs, finish_reasons

    @staticmethod
    def _scores(tok: torch.Tensor, valid: torch.Tensor, prompt_len: int, mask: torch.Tensor, rm_helpful: nn.Module,
                rm_safety: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Both reward models' raw scores (b,) of a window of rows (tokens, key_valid, P', its (b, R') mask)."""
        last = prompt_len + last_token_index(mask)  # (b,) the response's last token in tok
        return score(rm_helpful, tok, last, valid).float(), score(rm_safety, tok, last, valid).float()

    @torch.no_grad()
    def evaluate(self, prompts: list[list[int]], is_safety: list[bool]) -> dict[str, float]:
        """Greedy answers to held-out prompts (this rank's share; every rank the same count under FSDP) scored by
        both reward models: the mean R_c over every rank's rows, a truncated answer (with a truncation_penalty)
        counting 0. The reward models, never the oracle: this selects the stage's output."""
        cfg, device = self.config, self.device
        policy, rm_helpful, rm_safety = unwrap(self.policy), unwrap(self.rm_helpful), unwrap(self.rm_safety)
        was_training = policy.training
        policy.eval()
        responses, _, finish_reasons = self._rollout(
            prompts, lambda i: SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0))
        policy.train(was_training)
        tokens, key_valid, mask = build_sequences(prompts, responses, self.pad_id, device)
        P, raw = max(len(p) for p in prompts), torch.zeros(2, len(prompts), device=device)
        for i in range(0, len(prompts), cfg.forward_batch_size):
            rows = slice(i, i + cfg.forward_batch_size)
            start, p, r = _window(key_valid[rows], mask[rows], P)
            raw[:, rows] = torch.stack(self._scores(tokens[rows, start:P + r], key_valid[rows, start:P + r], p,
                                                    mask[rows, :r], rm_helpful, rm_safety))
        r_helpful, r_safety = torch.sigmoid(raw)
        r_c = piecewise_reward(r_helpful, r_safety, torch.tensor(is_safety, dtype=torch.bool, device=device),
                               cfg.safety_threshold)
        truncated = torch.tensor([f != "stop" for f in finish_reasons], dtype=torch.float, device=device)
        if cfg.truncation_penalty is not None:
            r_c = r_c * (1 - truncated)
        sums = torch.stack([r_c.sum(), truncated.sum(), torch.tensor(float(len(prompts)), device=device)])
        sums = self.reduce(sums) if self.reduce else sums
        return {"heldout_reward": (sums[0] / sums[2]).item(), "heldout_truncated": (sums[1] / sums[2]).item()}

    def update(self, experience: Experience) -> dict[str, float]:
        """Phase 6: ppo_epochs over shuffled minibatches, one policy and one value optimizer step per minibatch."""
        cfg, exp = self.config, experience
        B, P = exp.tokens.shape[0], exp.prompt_len
        t0 = _now(self.device)
        self.policy.train()
        self.value_model.train()
        generator = torch.Generator().manual_seed((cfg.seed or 0) + 7919 * self.global_step)
        totals: dict[str, float] = {}
        n_minibatches = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=generator).to(exp.tokens.device)
            for i in range(0, B, self.local_minibatch):
                rows = order[i:i + self.local_minibatch]
                start, p, r = _window(exp.key_valid[rows], exp.mask[rows], P)
                tok, valid = exp.tokens[rows, start:P + r], exp.key_valid[rows, start:P + r]
                mask = exp.mask[rows, :r]
                num_tokens = self._tokens_per_rank(mask)

                # Policy: clipped surrogate on the ratio pi_theta / pi_old over response tokens.
                logits = response_outputs(self.policy, tok, valid, p)  # (b, r, V)
                new_logprobs = logprobs_from_logits(logits, tok[:, p:])
                old_logprobs = exp.logprobs[rows, :r]
                policy_loss, clip_fraction = ppo_policy_loss(new_logprobs, old_logprobs, exp.advantages[rows, :r],
                                                             mask, cfg.cliprange, num_tokens)
                self.policy_optimizer.zero_grad(set_to_none=True)
                policy_loss.backward()
                policy_grad_norm = clip_grad_norm(self.policy, cfg.max_grad_norm)
                self.policy_optimizer.step()

                # Value: clipped regression onto the GAE returns.
                new_values = response_outputs(self.value_model, tok, valid, p)[..., 0].float()  # (b, r)
                value_loss, value_clip_fraction = ppo_value_loss(new_values, exp.values[rows, :r],
                                                                 exp.returns[rows, :r], mask, cfg.cliprange_value,
                                                                 num_tokens)
                self.value_optimizer.zero_grad(set_to_none=True)
                (cfg.vf_coef * value_loss).backward()
                value_grad_norm = clip_grad_norm(self.value_model, cfg.max_grad_norm)
                self.value_optimizer.step()

                with torch.no_grad():
                    log_ratio = (new_logprobs - old_logprobs) * mask
                    minibatch = {
                        "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                        "clip_fraction": clip_fraction, "value_clip_fraction": value_clip_fraction,
                        "entropy": masked_mean(entropy_from_logits(logits.detach()), mask),
                        "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),  # old -> new policy drift
                        "policy_grad_norm": policy_grad_norm, "value_grad_norm": value_grad_norm,
                    }
                for key, value in minibatch.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                n_minibatches += 1
        stats = {key: total / n_minibatches for key, total in totals.items()}
        stats["time_update_s"] = _now(self.device) - t0
        return stats

    def _tokens_per_rank(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The minibatch's response tokens over all ranks / ranks: dividing each rank's loss sum by it makes the
        averaged gradients those of the mean over every rank's tokens (ranks' token counts differ)."""
        if self.reduce is None:
            return None
        return (self.reduce(mask.sum()) / self.world).clamp(min=1)

    # ---- resume ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Optimizer states and the step counter (model weights are saved by the caller's checkpoint)."""
        return {"policy_optimizer": self.policy_optimizer.state_dict(),
                "value_optimizer": self.value_optimizer.state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        self.global_step = int(state["global_step"])
