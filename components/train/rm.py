"""Reward-model training on Ray Train: initialised from the SFT checkpoint with a scalar head, margin ranking loss,
one epoch (Llama 2 §3.2.2), held-out accuracy overall and per rating level."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.cluster import RayConfig
from components.train import parallel
from components.train.core import (RankZeroLogger, all_reduce_mean, cosine_lr, make_optimizer, meta_model, report,
                                   restore_train_state, save_train_state, train_to_folder, unwrap, worker_setup)
from components.rlhf.losses import rating_margins
from components.rlhf.reward import PreferencePair, collate_pairs, evaluate_rm, init_reward_model, rm_loss_and_metrics
from model.checkpoint import TOKENIZER_FILE, load_args, load_checkpoint
from model.kernels import bf16_autocast
from model.tokenizer import Tokenizer


@dataclass(frozen=True)
class RMTrainConfig:
    """params `rm` (both reward-model stages): the loop's hyper-parameters, the held-out share, the Ray workers."""

    val_fraction: float = 0.1  # items held out for accuracy: every pair of those items (components/data/datasets.py
    #                            held_out_items), so no validation prompt's item is trained on
    lr: float = 1e-4  # paper: 5e-6 (70B) / 1e-5 (others); tiny models from scratch need more
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    epochs: float = 1.0  # the paper trains one epoch: more overfits
    batch_size: int = 16  # pairs per step across workers
    # pairs per forward/backward on one worker (gradient accumulation above it); null = the worker's whole share.
    # Activation memory grows with it: 2 sequences of up to max_seq_len tokens per pair (`make plan`).
    micro_batch_size: int | None = None
    margin: str = "small"  # "small" (1, 2/3, 1/3, 0) or "large" (3, 2, 1, 0) per rating level, or "none"
    # rm_safety: the safety threshold chosen on the held-out answers (rlhf.safety_threshold: auto) is the largest
    # whose precision of "score < t => unsafe" reaches this (the paper's 0.15 had 0.89)
    threshold_precision: float = 0.89
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    grad_clip: float = 1.0
    bf16: bool = True
    log_every: int = 10
    checkpoint_every: int = 200
    seed: int = 0
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"params section 'rm': micro_batch_size must be >= 1 or null, got {self.micro_batch_size}")


def rm_train_loop(config: dict) -> None:
    import ray.train.torch

    cfg, rank, world, data = worker_setup(config)
    train_pairs, val_pairs = data["train"], data["val"]
    if parallel.materialises(cfg.ray.strategy, rank):
        sft, tokenizer = load_checkpoint(config["init"])
        model = init_reward_model(sft).train()
    else:  # fsdp: the weights arrive from rank 0 (parallel.prepare)
        model = meta_model(load_args(config["init"]).replace(head="scalar"))
        tokenizer = Tokenizer.load(Path(config["init"]) / TOKENIZER_FILE)
    device = ray.train.torch.get_device()
    model = parallel.prepare(model, cfg.ray, device, rank)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    margins = None if cfg.margin == "none" else rating_margins(cfg.margin)
    if cfg.batch_size % world:
        raise ValueError(f"rm batch_size {cfg.batch_size} must divide evenly over {world} workers")
    local = cfg.batch_size // world
    micro = cfg.micro_batch_size or local
    steps_per_epoch = max(1, len(train_pairs) // cfg.batch_size)
    total = max(1, int(cfg.epochs * steps_per_epoch))
    state = restore_train_state({"model": (model, optimizer)}, config.get("resume_from")) or {"step": 0}
    logger = RankZeroLogger(config["stage"], config.get("run_id"), config.get("tracking_uri"), total,
                            state.get("history"))
    step = state["step"]

    def save(folder: Path, final: bool = False) -> None:
        save_train_state(folder, {"model": (model, optimizer)}, tokenizer, {"step": step + 1}, cfg,
                         logger.history_file(), final)

    t0 = time.perf_counter()
    for step in range(state["step"], total):
        lr = cosine_lr(step, total, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch, offset = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        idx = order[offset * cfg.batch_size:(offset + 1) * cfg.batch_size][rank * local:(rank + 1) * local]
        if micro < len(idx):  # like lengths in one micro-batch pad less; the step's gradient is the same sum
            idx = sorted(idx, key=lambda j: max(len(train_pairs[j].chosen), len(train_pairs[j].rejected)))
        chunks = [idx[i:i + micro] for i in range(0, len(idx), micro)]
        metrics = {"loss": 0.0, "accuracy": 0.0}
        for i, chunk in enumerate(chunks):
            batch = collate_pairs([train_pairs[j] for j in chunk], tokenizer.pad_id).to(device)
            with parallel.grad_sync(model, i == len(chunks) - 1), bf16_autocast(device.type, cfg.bf16):
                loss, chunk_metrics = rm_loss_and_metrics(model, batch, margins)
                (loss * len(chunk) / len(idx)).backward()  # the mean over the worker's share, as one forward
            for key in metrics:
                metrics[key] += chunk_metrics[key].item() * len(chunk) / len(idx)
        grad_norm = parallel.clip_grad_norm(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == total - 1:
            logger.log(step, {"train_loss": all_reduce_mean(metrics["loss"]),
                              "train_accuracy": all_reduce_mean(metrics["accuracy"]),
                              "lr": lr, "grad_norm": grad_norm, "pairs_per_s": (step + 1 - state["step"]) *
                              cfg.batch_size / (time.perf_counter() - t0)})
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            report({"step": step + 1}, save)
    # Held-out accuracy, overall and per rating level: every rank scores every pair (under fsdp each forward
    # gathers weights from all ranks, so all take part).
    accuracy = evaluate_rm(unwrap(model), val_pairs, tokenizer.pad_id)
    final = {"step": total, **{f"val_{k}": v for k, v in accuracy.items()}}
    logger.log(total, final)
    logger.flush()
    step = total - 1
    report(final, lambda folder: save(folder, final=True))


def train_rm(sft_checkpoint: str | Path, train_pairs: list[PreferencePair], val_pairs: list[PreferencePair],
             cfg: RMTrainConfig, stage: str, out_dir: str | Path, run_id: str | None = None) -> dict:
    return train_to_folder(rm_train_loop, {"train": cfg, "init": str(sft_checkpoint), "stage": stage,
                                           "run_id": run_id},
                           {"train": train_pairs, "val": val_pairs}, cfg.ray, stage, out_dir)
