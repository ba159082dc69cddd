"""PPO trainer: sequence layout, one step trains exactly what it should, and a toy reward is learned."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict

import pytest
import torch
from torch import nn

from components.common import config_from_dict
from components.rlhf.ppo import PPOConfig, PPOTrainer, build_sequences
from components.rlhf.reward import init_reward_model
from model.config import get_config
from model.generation import SamplingParams, generate
from model.llama import Transformer

VOCAB, PAD, EOS = 64, 0, 2


def make_models(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    policy = Transformer(get_config("llama2-debug", vocab_size=VOCAB)).init_weights(generator=g)
    ref = copy.deepcopy(policy)
    value = init_reward_model(policy, head_std=0.02, generator=g)
    rm_helpful = init_reward_model(policy, head_std=0.1, generator=g)
    rm_safety = init_reward_model(policy, head_std=0.1, generator=g)
    return policy, ref, value, rm_helpful, rm_safety


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 7))] for _ in range(n)]


def small_config(**overrides) -> PPOConfig:
    base = dict(rollout_batch_size=8, mini_batch_size=4, forward_batch_size=8, max_new_tokens=6, lr=1e-3,
                kl_coef=0.05, seed=0, safety_threshold=0.15)
    return PPOConfig(**{**base, **overrides})


def test_build_sequences_layout():
    tokens, key_valid, mask = build_sequences([[5, 6], [7]], [[8, 2], [9, 10, 11]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 8, 2, 0], [0, 7, 9, 10, 11]]
    assert key_valid.tolist() == [[True, True, True, True, False], [False, True, True, True, True]]
    assert mask.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]


def test_config_parses_with_the_common_parser_and_checks_its_values():
    config = config_from_dict(PPOConfig, {"kl_coef": 0.005, "safety_threshold": 0.15}, "ppo")
    assert config.kl_coef == 0.005 and config.cliprange == 0.2  # defaults filled in
    assert config_from_dict(PPOConfig, asdict(config)) == config
    with pytest.raises(ValueError, match=r"unknown keys \['kl_ctl'\] in params section 'ppo'"):
        config_from_dict(PPOConfig, {"kl_ctl": 0.1, "safety_threshold": 0.15}, "ppo")
    with pytest.raises(ValueError, match="safety_threshold"):  # no default: the one rlhf.safety_threshold param
        config_from_dict(PPOConfig, {"kl_coef": 0.005}, "ppo")
    with pytest.raises(ValueError, match="mini_batch_size"):
        PPOConfig(rollout_batch_size=4, mini_batch_size=8, safety_threshold=0.15)


STAT_KEYS = {"reward", "reward_helpful", "reward_safety", "safety_selected", "score", "kl", "non_score_reward",
             "response_length", "stopped_fraction", "truncated_fraction", "safety_rule_rate", "explained_variance",
             "value_mean", "return_mean", "policy_loss", "value_loss",
             "clip_fraction", "value_clip_fraction", "entropy", "approx_kl", "policy_grad_norm", "value_grad_norm",
             "rollout_logprob_error", "time_rollout_s", "time_experience_s", "time_update_s", "time_step_s"}


def test_step_trains_policy_and_value_only():
    torch.manual_seed(0)
    policy, ref, value, rm_helpful, rm_safety = make_models()
    trainable = {"policy": policy, "value": value}
    frozen = {"ref": ref, "rm_helpful": rm_helpful, "rm_safety": rm_safety}
    before = {name: copy.deepcopy(m.state_dict()) for name, m in {**trainable, **frozen}.items()}
    # forward_batch_size 3: rollout and forwards in uneven groups, each trimmed to its own padding
    trainer = PPOTrainer(policy, ref, value, rm_helpful, rm_safety, EOS, PAD, small_config(forward_batch_size=3))
    stats = trainer.step(random_prompts(8), [i % 2 == 0 for i in range(8)])

    for name, model in trainable.items():
        unchanged = [k for k, v in model.state_dict().items() if torch.equal(v, before[name][k])]
        assert not unchanged, f"{name}: parameters not updated: {unchanged}"
    for name, model in frozen.items():
        assert all(torch.equal(v, before[name][k]) for k, v in model.state_dict().items()), name
        assert not any(p.requires_grad for p in model.parameters())
    assert set(stats) == STAT_KEYS
    assert all(math.isfinite(v) for v in stats.values()), stats
    # generate()'s T=1 log-probs agree with the recomputed ones: prompt/response offsets and masks line up
    assert stats["rollout_logprob_error"] < 1e-4
    assert stats["kl"] == 0.0  # the policy is the reference before the first update
    assert stats["truncated_fraction"] == 1 - stats["stopped_fraction"] and 0 <= stats["safety_rule_rate"] <= 1
    assert stats["explained_variance"] <= 1
    assert trainer.global_step == 1 and trainer.state_dict()["global_step"] == 1


def test_experience_with_eos_and_greedy_decoding():
    policy, ref, value, rm_helpful, rm_safety = make_models()
    prompts = random_prompts(4, seed=1)
    # Make eos the greedy first token of prompt 0, so that row ends at once with its eos kept.
    eos = generate(policy, prompts[:1], SamplingParams(max_new_tokens=1, temperature=0), eos_id=-1).tokens[0][0]
    trainer = PPOTrainer(policy, ref, value, rm_helpful, rm_safety, eos, PAD,
                         small_config(rollout_batch_size=4, mini_batch_size=2, temperature=0.0))
    experience, stats = trainer.make_experience(prompts, [False] * 4)
    assert experience.responses[0] == [eos] and experience.finish_reasons[0] == "stop"
    lengths = experience.mask.sum(-1).long().tolist()
    assert lengths[0] == 1 and all(1 <= n <= 6 for n in lengths)
    assert all(len(r) == n for r, n in zip(experience.responses, lengths))
    assert stats["rollout_logprob_error"] < 1e-4  # greedy log-probs are T=1 log-probs too
    pad = experience.mask == 0
    for name in ("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        assert not getattr(experience, name)[pad].any(), name  # nothing leaks onto padding
    assert experience.tokens.shape == (4, max(map(len, prompts)) + max(lengths))
    with pytest.raises(ValueError, match="rollout_batch_size"):
        trainer.step(prompts[:3], [False] * 3)


class TokenRewardModel(nn.Module):
    """A stand-in reward model: raw score = 2 * (count of `target` in the sequence so far) - 2."""

    def __init__(self, target: int):
        super().__init__()
        self.target = target

    def forward(self, tokens, positions=None, attn_mask=None):
        return (2.0 * (tokens == self.target).float().cumsum(-1) - 2.0)[..., None]  # (B, T, 1)


class ConstantRewardModel(nn.Module):
    def __init__(self, value: float = 3.0):
        super().__init__()
        self.value = value  # default: sigmoid(3) = 0.95: safe, so R_c = R_helpful

    def forward(self, tokens, positions=None, attn_mask=None):
        return torch.full((*tokens.shape, 1), self.value)


def test_ppo_learns_to_emit_the_rewarded_token():
    torch.manual_seed(0)
    target = 7
    policy, ref, value, _, _ = make_models(seed=1)
    config = small_config(rollout_batch_size=32, mini_batch_size=8, forward_batch_size=32, max_new_tokens=8,
                          ppo_epochs=2, lr=3e-3, kl_coef=0.01)
    trainer = PPOTrainer(policy, ref, value, TokenRewardModel(target), ConstantRewardModel(), EOS, PAD, config)

    def target_rate(seed: int) -> float:
        out = generate(policy, random_prompts(64, seed=seed), SamplingParams(max_new_tokens=8, seed=seed), EOS)
        tokens = [t for row in out.tokens for t in row]
        return sum(t == target for t in tokens) / len(tokens)

    before = target_rate(100)
    rewards = [trainer.step(random_prompts(32, seed=step), [False] * 32)["reward"] for step in range(10)]
    after = target_rate(100)
    assert after > 3 * before and after > 0.2, (before, after, rewards)
    assert rewards[-1] > rewards[0]


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank: DDP-wrapped policy and value, its share (8) of the global batch (16) of prompts, one PPO step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        policy, ref, value, rm_helpful, rm_safety = make_models()  # same seed: identical replicas
        trainer = PPOTrainer(DDP(policy), ref, DDP(value), rm_helpful, rm_safety, EOS, PAD,
                             small_config(rollout_batch_size=16, mini_batch_size=8))
        stats = trainer.step(random_prompts(8, seed=10 + rank), [False] * 8)
        torch.save({"policy": policy.state_dict(), "value": value.state_dict(), "stats": stats},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_step_under_ddp_keeps_replicas_identical(tmp_path):
    """Two gloo ranks with different rollouts: gradients all-reduce, so the replicas stay equal; nothing hangs."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    initial_policy = make_models()[0].state_dict()
    for name in ("policy", "value"):
        for key, tensor in results[0][name].items():
            torch.testing.assert_close(results[1][name][key], tensor, msg=f"{name}.{key} differs across ranks")
    assert not torch.equal(results[0]["policy"]["output.weight"], initial_policy["output.weight"])
    assert results[0]["stats"]["response_length"] > 0
    assert results[0]["stats"]["reward"] != results[1]["stats"]["reward"]  # each rank scored its own rollout


def test_truncated_rollouts_get_the_penalty_and_the_safety_rule_rate_is_counted():
    """No eos is ever sampled (eos_id outside the vocabulary): every rollout is truncated, so with a penalty every
    score is the penalty; a safety RM scoring 0.05 < 0.15 makes the threshold rule fire on every row."""
    policy, ref, value, rm_helpful, _ = make_models()
    config = small_config(rollout_batch_size=4, mini_batch_size=2, truncation_penalty=-3.0, kl_coef=0.0)
    trainer = PPOTrainer(policy, ref, value, rm_helpful, ConstantRewardModel(-math.log(19)), VOCAB + 1, PAD, config)
    experience, stats = trainer.make_experience(random_prompts(4), [False] * 4)
    assert stats["truncated_fraction"] == 1.0 and stats["safety_rule_rate"] == pytest.approx(1.0)
    assert experience.rewards.sum(-1).tolist() == [-3.0] * 4  # KL 0: the penalty is the whole reward
    held = trainer.evaluate(random_prompts(4, seed=5), [False] * 4)
    assert held == {"heldout_reward": 0.0, "heldout_truncated": 1.0}  # a truncated answer earns nothing


def test_evaluate_is_greedy_and_scores_with_the_reward_models():
    policy, ref, value, rm_helpful, _ = make_models()
    trainer = PPOTrainer(policy, ref, value, TokenRewardModel(7), ConstantRewardModel(), EOS, PAD, small_config())
    prompts = random_prompts(5, seed=3)
    first, again = trainer.evaluate(prompts, [False] * 5), trainer.evaluate(prompts, [False] * 5)
    assert first == again and 0 < first["heldout_reward"] < 1  # greedy: deterministic
    out = generate(policy, prompts, SamplingParams(max_new_tokens=6, temperature=0), EOS)
    expected = [1 / (1 + math.exp(-(2 * (p + r).count(7) - 2))) for p, r in zip(prompts, out.tokens)]
    assert first["heldout_reward"] == pytest.approx(sum(expected) / 5, rel=1e-5)
