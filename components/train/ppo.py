"""The PPO stage on Ray Train: the policy (from the previous stage) and a value model (a copy of the helpful reward
model) trained by components.rlhf.ppo.PPOTrainer against a frozen reference policy and both frozen reward models.

Placement of the five models (components/train/parallel.py), per worker with P parameters per model and N workers:
- ddp: every model whole on every worker: policy and value with fp32 weights, gradients and AdamW moments
  (16 bytes/param each), the three frozen models in bf16 on GPU. Fits small models only (7B: ~240 GB).
- fsdp: policy and value sharded as every training stage (16P/N bytes each); the reference policy and both reward
  models frozen, in bf16 on GPU, sharded over the same workers (2P/N bytes each). Sharding them the same way, rather
  than on their own Ray actors, keeps every GPU busy in every phase: their forwards are batched full sequences (phase
  3), where gathering one block at a time costs little next to the compute, and no GPU sits idle holding a frozen
  model while the policy trains. Rollouts decode from the policy's full weights gathered once per iteration into a
  bf16 copy (2P bytes, freed after; `rollout_weights: gathered`) or, where that copy does not fit (70B on 80 GB),
  through the sharded policy in lock step (`sharded`: one block gathered per token step, slow). `make plan` gives the
  bytes per stage and profile.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from components.cluster import RayConfig
from components.rlhf.ppo import PPOConfig, PPOTrainer
from components.train import parallel
from components.train.core import (RankZeroLogger, all_reduce_mean, load_init, report, restore_train_state,
                                   save_train_state, train_to_folder, worker_setup)
from model.kernels import bf16_autocast


@dataclass(frozen=True, kw_only=True)
class PPOStageConfig(PPOConfig):
    """params `ppo` (with rlhf.safety_threshold): the algorithm's hyper-parameters, the stage's, the Ray workers."""

    iterations: int = 20  # PPO steps (each: rollout of rollout_batch_size prompts, then the update)
    log_every: int = 1
    checkpoint_every: int = 10  # iterations between resume points (policy, value, both optimizers; 0 = none)
    bf16: bool = True
    # fsdp: decode rollouts from the policy's weights gathered once per iteration ("gathered": 2 bytes/param on
    # every GPU, fast) or through the sharded policy, one block at a time ("sharded": fits when a full copy does not)
    rollout_weights: str = "gathered"
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rollout_weights not in ("gathered", "sharded"):
            raise ValueError(f"params section 'ppo': rollout_weights must be 'gathered' or 'sharded', got "
                             f"{self.rollout_weights!r}")
        workers = self.ray.num_workers
        if self.rollout_batch_size % workers or self.mini_batch_size % workers:
            raise ValueError(f"params section 'ppo': rollout_batch_size {self.rollout_batch_size} and mini_batch_size "
                             f"{self.mini_batch_size} are global: they must divide evenly over ray.num_workers "
                             f"{workers}")


SHOWN = ("reward", "kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "response_length", "time_rollout_s",
         "time_update_s")  # what each iteration prints and sends to MLflow (history.json keeps every statistic)


def shown(stats: dict) -> dict:
    return {k: stats[k] for k in SHOWN if k in stats}


def ppo_train_loop(config: dict) -> None:
    import json

    import ray.train.torch

    cfg, rank, world, (prompts, is_safety) = worker_setup(config)
    meta = not parallel.materialises(cfg.ray.strategy, rank)  # fsdp: rank 0 loads, the others build on meta
    policy, tokenizer = load_init({"checkpoint": config["policy"]}, meta)
    rm_helpful, _ = load_init({"checkpoint": config["rm_helpful"]}, meta)
    rm_safety, _ = load_init({"checkpoint": config["rm_safety"]}, meta)
    ref, value = copy.deepcopy(policy), copy.deepcopy(rm_helpful)  # value: InstructGPT's initialisation
    device = ray.train.torch.get_device()
    policy = parallel.prepare(policy.train(), cfg.ray, device, rank)
    value = parallel.prepare(value.train(), cfg.ray, device, rank)
    ref, rm_helpful, rm_safety = (parallel.prepare_frozen(m, cfg.ray, device, rank)
                                  for m in (ref, rm_helpful, rm_safety))
    sharded_decode = parallel.is_fsdp(policy) and cfg.rollout_weights == "sharded"
    trainer = PPOTrainer(policy, ref, value, rm_helpful, rm_safety, tokenizer.eos_id, tokenizer.pad_id, cfg,
                         rollout_model=None if sharded_decode else lambda: parallel.gathered(policy, device),
                         lockstep=parallel.all_finished if sharded_decode else None)
    trained = {"policy": (policy, trainer.policy_optimizer), "value": (value, trainer.value_optimizer)}
    state = restore_train_state(trained, config.get("resume_from")) or {"step": 0, "history": []}
    trainer.global_step, history = state["step"], state["history"]  # global_step seeds the sampling
    logged = [{"step": i, **shown(h)} for i, h in enumerate(history) if i % cfg.log_every == 0]
    logger = RankZeroLogger(config["stage"], config.get("run_id"), config.get("tracking_uri"), cfg.iterations, logged)

    def save(folder: Path, done: int, final: bool = False) -> None:
        save_train_state(folder, {"policy": (policy, None)} if final else trained, tokenizer, {"step": done}, cfg,
                         {"trainer_state/history.json": json.dumps(history)}, final)

    # The same global draw on every rank, each taking its share: the iteration's prompts do not depend on the workers.
    gen, share = torch.Generator().manual_seed(cfg.seed or 0), cfg.rollout_batch_size // world
    for it in range(cfg.iterations):
        idx = torch.randint(len(prompts), (cfg.rollout_batch_size,), generator=gen)[rank * share:(rank + 1) * share]
        idx = idx.tolist()
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
