"""The PPO stage on Ray Train: the policy (from the previous stage) and a value model (a copy of the helpful reward
model) trained by components.ppo.PPOTrainer against a frozen reference policy and both frozen reward models."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from components.train.core import RankZeroLogger, all_reduce_mean, report, set_threads, train_to_folder, unwrap
from components.rlhf.ppo import PPOConfig, PPOTrainer
from model.kernels import bf16_autocast
from model.checkpoint import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class PPOStageConfig:
    iterations: int = 20  # PPO steps (each: rollout of rollout_batch_size prompts per worker, then the update)
    log_every: int = 1
    bf16: bool = True


def ppo_train_loop(config: dict) -> None:
    import json

    import ray
    import ray.train
    import ray.train.torch

    stage_cfg = PPOStageConfig(**config["stage_cfg"])
    set_threads(config.get("cpus_per_worker", 1))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    ppo_cfg = PPOConfig.from_dict({**config["ppo"], "seed": config["ppo"].get("seed", 0) + rank})
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
    prompts, is_safety = ray.get(config["data"])
    logger = RankZeroLogger(config["stage"], config.get("run_id"), config.get("tracking_uri"), stage_cfg.iterations)
    gen = torch.Generator().manual_seed(ppo_cfg.seed or 0)
    history = []
    for it in range(stage_cfg.iterations):
        idx = torch.randint(len(prompts), (ppo_cfg.rollout_batch_size,), generator=gen).tolist()
        with bf16_autocast(device.type, stage_cfg.bf16):
            stats = trainer.step([prompts[i] for i in idx], [is_safety[i] for i in idx])
        stats = {k: all_reduce_mean(v) for k, v in stats.items()}
        history.append(stats)
        if it % stage_cfg.log_every == 0 or it == stage_cfg.iterations - 1:
            logger.log(it, {k: stats[k] for k in ("reward", "kl", "entropy", "clip_fraction", "value_loss",
                                                   "policy_loss", "response_length", "time_rollout_s",
                                                   "time_update_s") if k in stats})
    logger.flush()

    def save(folder: Path) -> None:
        save_checkpoint(folder, unwrap(policy), tokenizer, extra_files={
            "trainer_state/state.json": {"step": stage_cfg.iterations, "config": ppo_cfg.to_dict()},
            "trainer_state/history.json": json.dumps(history)})

    first, last = history[0], history[-1]
    report({"iterations": stage_cfg.iterations, "reward_first": first["reward"], "reward_last": last["reward"],
            "kl_last": last["kl"], "mean_rollout_s": sum(h["time_rollout_s"] for h in history) / len(history),
            "mean_update_s": sum(h["time_update_s"] for h in history) / len(history)}, save)


def train_ppo(policy_ckpt, rm_helpful_ckpt, rm_safety_ckpt, prompts: list[list[int]], is_safety: list[bool],
              ppo: dict, stage_cfg: PPOStageConfig, ray_cfg, stage: str, out_dir, run_id=None) -> dict:
    from dataclasses import asdict

    import ray

    from components.cluster import init_ray
    from components.track.tracking import tracking_uri

    init_ray(ray_cfg)
    return train_to_folder(ppo_train_loop, {
        "ppo": ppo, "stage_cfg": asdict(stage_cfg), "policy": str(policy_ckpt), "rm_helpful": str(rm_helpful_ckpt),
        "rm_safety": str(rm_safety_ckpt), "data": ray.put((prompts, is_safety)), "stage": stage, "run_id": run_id,
        "tracking_uri": tracking_uri(), "cpus_per_worker": ray_cfg.cpus_per_worker,
    }, ray_cfg, stage, out_dir)
