"""The one language-model training loop, run by Ray Train workers.

Pretraining, SFT, rejection-sampling fine-tuning, Ghost Attention and safety distillation differ only in their data
(packed token rows with IGNORE_INDEX where there is no loss) and their starting checkpoint. The loop reads top to
bottom: lr -> eval -> micro-steps -> clip -> step -> log -> checkpoint; what it shares with the reward-model and PPO
loops is in components.train.core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.cluster import RayConfig
from components.train import parallel
from components.train.core import (RankZeroLogger, all_reduce_mean, cosine_lr, load_init, make_optimizer, report,
                                   restore_train_state, save_train_state, train_to_folder, worker_setup)
from model.config import ModelSpec
from model.kernels import bf16_autocast, compile_enabled
from model.loss import IGNORE_INDEX


@dataclass(frozen=True)
class LMTrainConfig:
    """A language-model stage's config (params `pretrain`, `sft`, ...): the loop's hyper-parameters, the data shaping,
    and the Ray workers. The stages that also sample extend it (flows/_finetune.py)."""

    seq_len: int = 256  # tokens per training row (packed for pretraining, one padded example for fine-tuning)
    val_fraction: float = 0.05  # rows (or examples) held out for val_loss
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay ends at 10% of peak (Llama 2)
    warmup_steps: int = 20
    epochs: float = 1.0  # passes over the data (ignored when max_steps is set)
    max_steps: int | None = None
    batch_size: int = 16  # sequences per optimizer step, across all workers
    micro_batch_size: int = 16  # sequences per forward/backward on one worker (gradient accumulation above it)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    grad_clip: float = 1.0
    bf16: bool = True  # bf16 autocast where the device has native bf16 (AVX512-BF16/AMX CPUs, GPUs)
    # torch.compile the model's forward and backward: llama2-6m on 2 cores trains ~20-30% faster in bf16 (~7% in
    # fp32) but the first step costs 20-36 s, and again for evaluation's no-grad forward: a win from some
    # hundreds of steps on, not for the short stages of the CI and tiny profiles. $LLAMA2_COMPILE=0 turns it off.
    compile: bool = False  # (with ray.strategy ddp)
    eval_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 200  # steps between Ray Train checkpoints (resume points)
    seed: int = 0
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        if self.compile and self.ray.strategy == "fsdp":
            raise ValueError("compile: true runs with ray.strategy 'ddp' only (compiling FSDP2 blocks is still to do)")


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(LMTrainConfig):
    model: ModelSpec = ModelSpec()  # params `model`: the network to train (or import)


# ---------------------------------------------------------------------------------------------------------------
# The loop.

@torch.no_grad()
def evaluate_loss(model, data: dict, micro_batch: int, device, bf16: bool) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, data["inputs"].shape[0], micro_batch):
        inputs = data["inputs"][start:start + micro_batch].to(device)
        targets = data["targets"][start:start + micro_batch].to(device)
        n = int((targets != IGNORE_INDEX).sum())
        if n == 0:
            continue
        with bf16_autocast(device.type, bf16):
            total += model(inputs, targets=targets).item() * n
        count += n
    model.train()
    return all_reduce_mean(total / max(count, 1))


def lm_train_loop(config: dict) -> None:
    """Ray Train worker entry point. config: train (the stage's LMTrainConfig), init, data (ObjectRef of
    {"train": {...}, "val": {...}}), stage, run_id, tracking_uri."""
    import ray.train.torch

    cfg, rank, world, data = worker_setup(config)
    train, val = data["train"], data["val"]
    model, tokenizer = load_init(config["init"], meta=not parallel.materialises(cfg.ray.strategy, rank))
    if compile_enabled(cfg.compile):
        model.compile()  # in place: state-dict keys, checkpoints and DDP wrapping stay as they are
    device = ray.train.torch.get_device()
    model = parallel.prepare(model, cfg.ray, device, rank)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)

    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {world} workers")
    n_rows, local_batch = train["inputs"].shape[0], cfg.batch_size // world
    steps_per_epoch = max(1, n_rows // cfg.batch_size)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    state = restore_train_state({"model": (model, optimizer)}, config.get("resume_from")) or {"step": 0}
    logger = RankZeroLogger(config["stage"], config.get("run_id"), config.get("tracking_uri"), total,
                            state.get("history"))

    def save(folder: Path, final: bool = False) -> None:
        save_train_state(folder, {"model": (model, optimizer)}, tokenizer, {"step": step + 1}, cfg,
                         logger.history_file(), final)

    tokens_seen, t0 = 0, time.perf_counter()
    for step in range(state["step"], total):
        lr = cosine_lr(step, total, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if step % cfg.eval_every == 0 and val["inputs"].shape[0]:
            logger.log(step, {"val_loss": evaluate_loss(model, val, cfg.micro_batch_size, device, cfg.bf16)})
        # Same global batch whatever the worker count: one permutation per epoch, each rank takes its slice.
        epoch, offset = divmod(step, steps_per_epoch)
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batch = order[offset * cfg.batch_size:(offset + 1) * cfg.batch_size][rank * local_batch:(rank + 1) * local_batch]
        micro = [batch[i:i + cfg.micro_batch_size] for i in range(0, local_batch, cfg.micro_batch_size)]
        loss_sum = 0.0
        for i, idx in enumerate(micro):
            inputs, targets = train["inputs"][idx].to(device), train["targets"][idx].to(device)
            with parallel.grad_sync(model, i == len(micro) - 1), bf16_autocast(device.type, cfg.bf16):
                loss = model(inputs, targets=targets) / len(micro)
            loss.backward()
            loss_sum += loss.item()
            tokens_seen += inputs.numel() * world
        grad_norm = parallel.clip_grad_norm(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == total - 1:
            elapsed = time.perf_counter() - t0
            logger.log(step, {"train_loss": all_reduce_mean(loss_sum), "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens_seen / elapsed})
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            report({"step": step + 1}, save)
    final = {"step": total, "state_bytes_per_worker": parallel.local_state_bytes(model, optimizer)}
    if val["inputs"].shape[0]:
        final["val_loss"] = evaluate_loss(model, val, cfg.micro_batch_size, device, cfg.bf16)
        logger.log(total, {"val_loss": final["val_loss"]})
    logger.flush()
    step = total - 1
    report(final, lambda folder: save(folder, final=True))


def train_lm(init: dict, train: dict, val: dict, cfg: LMTrainConfig, stage: str, out_dir: str | Path,
             run_id: str | None = None, resume_from: str | Path | None = None) -> dict:
    """Run the LM loop on cfg.ray's Ray Train workers (continuing a resume point when given) and materialise the
    final checkpoint folder at out_dir. Returns the final metrics."""
    return train_to_folder(lm_train_loop, {"train": cfg, "init": init, "stage": stage, "run_id": run_id},
                           {"train": train, "val": val}, cfg.ray, stage, out_dir, resume_from)
