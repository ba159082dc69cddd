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
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

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
    # the value model is rm_helpful (InstructGPT's choice) with its scalar head zeroed ("zero": every value starts at
    # 0, the mean of the whitened returns it regresses onto; the RM's head outputs raw logits on another scale) or
    # kept ("rm")
    value_head: str = "zero"
    # Early stopping: eval_prompts prompts held out of the rollouts (0: none), scored every eval_every iterations
    # (and before the first) by the mean R_c of greedy answers; the best evaluation's policy is the stage's output,
    # and training stops after `patience` evaluations without improvement (null: runs every iteration)
    eval_prompts: int = 0
    eval_every: int = 4
    patience: int | None = None
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rollout_weights not in ("gathered", "sharded"):
            raise ValueError(f"params section 'ppo': rollout_weights must be 'gathered' or 'sharded', got "
                             f"{self.rollout_weights!r}")
        if self.value_head not in ("zero", "rm"):
            raise ValueError(f"params section 'ppo': value_head must be 'zero' or 'rm', got {self.value_head!r}")
        workers = self.ray.num_workers
        if self.eval_prompts < 0 or self.eval_prompts % workers or self.eval_every < 1 or (
                self.patience is not None and self.patience < 1):
            raise ValueError(f"params section 'ppo': eval_prompts ({self.eval_prompts}) must be >= 0 and divide "
                             f"evenly over ray.num_workers {workers}, eval_every >= 1 and patience >= 1 or null")
        if self.rollout_batch_size % workers or self.mini_batch_size % workers:
            raise ValueError(f"params section 'ppo': rollout_batch_size {self.rollout_batch_size} and mini_batch_size "
                             f"{self.mini_batch_size} are global: they must divide evenly over ray.num_workers "
                             f"{workers}")


SHOWN = ("reward", "kl", "entropy", "clip_fraction", "value_loss", "explained_variance", "policy_loss",
         "response_length", "truncated_fraction", "safety_rule_rate", "heldout_reward", "time_rollout_s",
         "time_update_s")  # what each iteration prints and sends to MLflow (history.json keeps every statistic)
BEST_DIR = "trainer_state/best_policy"  # resume points: the best evaluation's policy weights (sharded as trained)


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
    if cfg.value_head == "zero":
        with torch.no_grad():
            value.output.weight.zero_()  # values 0 at first: the whitened returns' mean (a no-op on meta ranks)
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
    best = {"weights": None}  # the best evaluation's policy state dict (this rank's shards), when not the current

    def load_best(folder: Path) -> None:
        if (folder / BEST_DIR).is_dir():
            best["weights"] = _policy_copy(policy)  # a template in the current sharding, loaded in place
            dcp.load(best["weights"], checkpoint_id=str(folder / BEST_DIR))

    state = restore_train_state(trained, config.get("resume_from"), load_best) or {"step": 0, "history": []}
    trainer.global_step, history = state["step"], state["history"]  # global_step seeds the sampling
    # evaluations so far: iteration and held-out reward of the best, evaluations since it improved
    early = state.get("early") or {"best_iteration": 0, "best_reward": None, "since_best": 0}
    # The held-out prompts: a seeded draw, the same on every rank, each rank scoring its share; never rolled out.
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed((cfg.seed or 0) + 1)).tolist()
    held, pool = order[:cfg.eval_prompts], order[cfg.eval_prompts:]
    if len(pool) < 1:
        raise ValueError(f"ppo: eval_prompts {cfg.eval_prompts} leaves no prompts of {len(prompts)} for rollouts")
    held = held[rank * (len(held) // world):(rank + 1) * (len(held) // world)]
    def logs(it: int, stats: dict) -> bool:  # which iterations are printed and sent to MLflow
        return it % cfg.log_every == 0 or it == cfg.iterations - 1 or "heldout_reward" in stats

    logged = [{"step": i, **shown(h)} for i, h in enumerate(history) if logs(i, h)]
    logger = RankZeroLogger(config["stage"], config.get("run_id"), config.get("tracking_uri"), cfg.iterations, logged)

    def save(folder: Path, done: int, final: bool = False) -> None:
        save_train_state(folder, {"policy": (policy, None)} if final else trained, tokenizer,
                         {"step": done, "early": early}, cfg, {"trainer_state/history.json": json.dumps(history)},
                         final)
        if not final and best["weights"] is not None:
            dcp.save(best["weights"], checkpoint_id=str(folder / BEST_DIR))

    def evaluate(done: int) -> dict:
        """Score the policy after `done` iterations on the held-out prompts; keep it if it is the best so far."""
        with bf16_autocast(device.type, cfg.bf16):
            result = trainer.evaluate([prompts[i] for i in held], [is_safety[i] for i in held])
        if early["best_reward"] is None or result["heldout_reward"] > early["best_reward"]:
            early.update(best_iteration=done, best_reward=result["heldout_reward"], since_best=0)
            best["weights"] = None  # the current policy is the best: nothing to copy until it changes
        else:  # best["weights"] holds the best policy, copied by before_step when it was the current one
            early["since_best"] += 1
        return result

    def before_step(done: int) -> None:
        """Keep a copy of the best policy before training changes it, when the current policy is the best."""
        if held and best["weights"] is None and early["best_iteration"] == done:
            best["weights"] = _policy_copy(policy)

    # The same global draw on every rank, each taking its share: the iteration's prompts do not depend on the workers.
    gen, share = torch.Generator().manual_seed(cfg.seed or 0), cfg.rollout_batch_size // world
    # The starting policy is a candidate too: PPO must beat it on the held-out prompts to replace it.
    start_eval = evaluate(0) if held and state["step"] == 0 else {}
    done = state["step"]
    for it in range(cfg.iterations):
        idx = torch.randint(len(pool), (cfg.rollout_batch_size,), generator=gen)[rank * share:(rank + 1) * share]
        idx = [pool[i] for i in idx.tolist()]
        if it < state["step"]:
            continue  # done before the restart: its prompts are drawn all the same, so the sequence continues
        if cfg.patience is not None and early["since_best"] >= cfg.patience:
            break  # early stop (also when a restart resumes at the point where the run had stopped)
        before_step(it)
        with bf16_autocast(device.type, cfg.bf16):
            stats = trainer.step([prompts[i] for i in idx], [is_safety[i] for i in idx])
        stats = {k: all_reduce_mean(v) for k, v in stats.items()}
        done = it + 1
        if it == 0:
            stats.update({f"{k}_start": v for k, v in start_eval.items()})  # the evaluation before any training
        if held and (done % cfg.eval_every == 0 or done == cfg.iterations):
            stats.update(evaluate(done))
        history.append(stats)
        if logs(it, stats):
            logger.log(it, shown(stats))
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.iterations:
            logger.flush()
            report({"iteration": done}, lambda folder: save(folder, done))
    logger.flush()
    if held and best["weights"] is not None:  # the last evaluation was not the best: back to the best policy
        set_model_state_dict(policy, best["weights"])
    first, last = history[0], history[-1]
    metrics = {"iterations": done, "reward_first": first["reward"], "reward_last": last["reward"],
               "kl_last": last["kl"], "explained_variance_last": last["explained_variance"],
               "truncated_fraction_last": last["truncated_fraction"], "safety_rule_rate_last": last["safety_rule_rate"],
               "mean_rollout_s": sum(h["time_rollout_s"] for h in history) / len(history),
               "mean_update_s": sum(h["time_update_s"] for h in history) / len(history)}
    if held:
        metrics.update(heldout_reward_best=early["best_reward"], best_iteration=early["best_iteration"],
                       heldout_reward_start=first.get("heldout_reward_start", early["best_reward"]),
                       stopped_early=done < cfg.iterations)
    report(metrics, lambda folder: save(folder, done, final=True))


def _policy_copy(policy) -> dict:
    """A copy of the policy's state dict as it is sharded (DTensors under fsdp; keys without DDP's prefix). A copy:
    the state dict's tensors share storage with the live parameters."""
    return {k: v.detach().clone() for k, v in get_model_state_dict(policy).items()}


def train_ppo(policy_ckpt, rm_helpful_ckpt, rm_safety_ckpt, prompts: list[list[int]], is_safety: list[bool],
              cfg: PPOStageConfig, stage: str, out_dir, run_id=None, resume_from=None) -> dict:
    return train_to_folder(ppo_train_loop, {
        "train": cfg, "policy": str(policy_ckpt), "rm_helpful": str(rm_helpful_ckpt),
        "rm_safety": str(rm_safety_ckpt), "stage": stage, "run_id": run_id}, (prompts, is_safety), cfg.ray, stage,
        out_dir, resume_from)
