"""The PPO stage on Ray Train: the policy (from the previous stage) and a value model (a copy of the helpful reward
model) trained by components.ppo.PPOTrainer against a frozen reference policy and both frozen reward models."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from components.cluster import RayConfig
from components.rlhf.ppo import PPOConfig, PPOTrainer
from components.train.core import (RankZeroLogger, all_reduce_mean, report, restore_train_state, save_train_state,
                                   train_to_folder, worker_setup)
from model.checkpoint import load_checkpoint
from model.kernels import bf16_autocast


@dataclass(frozen=True, kw_only=True)
class PPOStageConfig(PPOConfig):
    """params `ppo` (with rlhf.safety_threshold): the algorithm's hyper-parameters, the stage's, the Ray workers."""

    iterations: int = 20  # PPO steps (each: rollout of rollout_batch_size prompts per worker, then the update)
    log_every: int = 1
    checkpoint_every: int = 10  # iterations between resume points (policy, value, both optimizers; 0 = none)
    bf16: bool = True
    # fsdp rollouts: "gathered" (the policy's full weights gathered once per rollout into a plain bf16 copy on every
    # GPU, 2 bytes/param, freed after: fast decoding) or "sharded" (decode through the FSDP2 model, one block's
    # weights at a time: fits where a full copy does not, e.g. 70B on 80 GB, but slow). `make plan` shows both.
    rollout_weights: str = "gathered"
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rollout_weights not in ("gathered", "sharded"):
            raise ValueError(f"params section 'ppo': rollout_weights must be 'gathered' or 'sharded', got "
                             f"{self.rollout_weights!r}")


SHOWN = ("reward", "kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "response_length", "time_rollout_s",
         "time_update_s")  # what each iteration prints and sends to MLflow (history.json keeps every statistic)


def shown(stats: dict) -> dict:
    return {k: stats[k] for k in SHOWN if k in stats}


def ppo_train_loop(config: dict) -> None:
    import json

    import ray.train.torch

    cfg, rank, _, (prompts, is_safety) = worker_setup(config)
    ppo_cfg = replace(cfg, seed=None if cfg.seed is None else cfg.seed + rank)  # each rank samples its own rollouts
    policy, tokenizer = load_checkpoint(config["policy"])
    ref = copy.deepcopy(policy)
    rm_helpful, _ = load_checkpoint(config["rm_helpful"])
    rm_safety, _ = load_checkpoint(config["rm_safety"])
    value = copy.deepcopy(rm_helpful)  # InstructGPT's value initialisation
    device = ray.train.torch.get_device()
    policy = ray.train.torch.prepare_model(policy.train())
    value = ray.train.torch.prepare_model(value.train())
    trainer = PPOTrainer(policy, ref.to(device), value, rm_helpful.to(device), rm_safety.to(device),
                         tokenizer.eos_id, tokenizer.pad_id, ppo_cfg)
    trained = {"policy": (policy, trainer.policy_optimizer), "value": (value, trainer.value_optimizer)}
    state = restore_train_state(trained, config.get("resume_from")) or {"step": 0, "history": []}
    trainer.global_step, history = state["step"], state["history"]  # global_step seeds the sampling
    logged = [{"step": i, **shown(h)} for i, h in enumerate(history) if i % cfg.log_every == 0]
    logger = RankZeroLogger(config["stage"], config.get("run_id"), config.get("tracking_uri"), cfg.iterations, logged)

    def save(folder: Path, done: int, final: bool = False) -> None:
        save_train_state(folder, {"policy": (policy, None)} if final else trained, tokenizer, {"step": done}, cfg,
                         {"trainer_state/history.json": json.dumps(history)}, final)

    gen = torch.Generator().manual_seed(ppo_cfg.seed or 0)
    for it in range(cfg.iterations):
        idx = torch.randint(len(prompts), (ppo_cfg.rollout_batch_size,), generator=gen).tolist()
        if it < state["step"]:
            continue  # done before the restart: its prompts are drawn all the same, so the sequence continues
        with bf16_autocast(device.type, cfg.bf16):
            stats = trainer.step([prompts[i] for i in idx], [is_safety[i] for i in idx])
        stats = {k: all_reduce_mean(v) for k, v in stats.items()}
        history.append(stats)
        if it % cfg.log_every == 0 or it == cfg.iterations - 1:
            logger.log(it, shown(stats))
        if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
            logger.flush()
            report({"iteration": it + 1}, lambda folder: save(folder, it + 1))
    logger.flush()
    first, last = history[0], history[-1]
    report({"iterations": cfg.iterations, "reward_first": first["reward"], "reward_last": last["reward"],
            "kl_last": last["kl"], "mean_rollout_s": sum(h["time_rollout_s"] for h in history) / len(history),
            "mean_update_s": sum(h["time_update_s"] for h in history) / len(history)},
           lambda folder: save(folder, cfg.iterations, final=True))


def train_ppo(policy_ckpt, rm_helpful_ckpt, rm_safety_ckpt, prompts: list[list[int]], is_safety: list[bool],
              cfg: PPOStageConfig, stage: str, out_dir, run_id=None, resume_from=None) -> dict:
    return train_to_folder(ppo_train_loop, {
        "train": cfg, "policy": str(policy_ckpt), "rm_helpful": str(rm_helpful_ckpt),
        "rm_safety": str(rm_safety_ckpt), "stage": stage, "run_id": run_id}, (prompts, is_safety), cfg.ray, stage,
        out_dir, resume_from)
