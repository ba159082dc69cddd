"""The one language-model training loop, run by Ray Train workers.

Pretraining, SFT, rejection-sampling fine-tuning, Ghost Attention and safety distillation differ only in their data
(packed token rows with IGNORE_INDEX where there is no loss) and their starting checkpoint. The loop reads top to
bottom: lr -> eval -> micro-steps -> clip -> step -> log -> checkpoint; what it shares with the reward-model and PPO
loops is in components.train.core.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from components.cluster import RayConfig
from components.data.token_blocks import StreamOrder, TokenBlocks, stream_dataset, tensor_chunks, write_blocks
from components.train import parallel
from components.train.core import (RankZeroLogger, all_reduce_mean, cosine_lr, load_init, make_optimizer, report,
                                   restore_train_state, save_train_state, storage_uri, train_to_folder, worker_setup)
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


def global_batches(step: int, batch_size: int):
    """The Ray Dataset "train" (components.data.token_blocks.stream_dataset) as {"inputs", "targets", "step"} numpy
    batches of the global batch size, from `step` on: batches of steps before it (a stream that starts at an earlier
    resume point) are skipped; each batch's rows are checked to be its step's."""
    import ray.train

    for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=batch_size, batch_format="numpy",
                                                                   prefetch_batches=2):
        if int(batch["step"][0]) < step:
            continue
        if len(batch["step"]) != batch_size or (batch["step"] != step).any():
            raise RuntimeError(f"the token stream is out of step: rows of steps {sorted(set(batch['step'].tolist()))} "
                               f"where step {step}'s {batch_size} rows were due")
        yield batch
        step += 1


def lm_train_loop(config: dict) -> None:
    """Ray Train worker entry point. config: train (the stage's LMTrainConfig), init, data (ObjectRef of
    {"val": {...}}), rows (training rows), stage, run_id, tracking_uri; the training rows stream from the Ray
    Dataset "train" in the exact order of the steps (every worker reads each global batch and keeps its slice)."""
    import ray.train.torch

    cfg, rank, world, data = worker_setup(config)
    val = data["val"]
    model, tokenizer = load_init(config["init"], meta=not parallel.materialises(cfg.ray.strategy, rank))
    if compile_enabled(cfg.compile):
        model.compile()  # in place: state-dict keys, checkpoints and DDP wrapping stay as they are
    device = ray.train.torch.get_device()
    model = parallel.prepare(model, cfg.ray, device, rank)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)

    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {world} workers")
    local_batch, total = cfg.batch_size // world, total_steps(cfg, config["rows"])
    state = restore_train_state({"model": (model, optimizer)}, config.get("resume_from")) or {"step": 0}
    logger = RankZeroLogger(config["stage"], config.get("run_id"), config.get("tracking_uri"), total,
                            state.get("history"))

    def save(folder: Path, final: bool = False) -> None:
        save_train_state(folder, {"model": (model, optimizer)}, tokenizer, {"step": step + 1}, cfg,
                         logger.history_file(), final)

    tokens_seen, t0 = 0, time.perf_counter()
    batches = global_batches(state["step"], cfg.batch_size)
    for step in range(state["step"], total):
        lr = cosine_lr(step, total, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if step % cfg.eval_every == 0 and val["inputs"].shape[0]:
            logger.log(step, {"val_loss": evaluate_loss(model, val, cfg.micro_batch_size, device, cfg.bf16)})
        # Same global batch whatever the worker count (the stream's order is the steps'), each rank takes its slice.
        batch = next(batches)
        mine = {k: torch.from_numpy(batch[k][rank * local_batch:(rank + 1) * local_batch]).long()
                for k in ("inputs", "targets")}
        micro = range(0, local_batch, cfg.micro_batch_size)
        loss_sum = 0.0
        for i, start in enumerate(micro):
            inputs, targets = (mine[k][start:start + cfg.micro_batch_size].to(device) for k in ("inputs", "targets"))
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


def total_steps(cfg: LMTrainConfig, rows: int) -> int:
    return cfg.max_steps or max(1, int(cfg.epochs * max(1, rows // cfg.batch_size)))


@contextmanager
def scratch_blocks(ray_cfg: RayConfig, name: str):
    """A fresh folder in Ray's storage (which every node reads) for a run's token blocks; removed afterwards."""
    from components.data.token_blocks import filesystem

    uri = f"{storage_uri(ray_cfg)}/token_blocks/{name}-{time.time_ns()}"
    try:
        yield uri
    finally:
        fs, root = filesystem(uri)
        if fs.get_file_info(root).type.name != "NotFound":
            fs.delete_dir(root)


def registered_step(run_folder: str) -> int:
    """The step of the latest resume point Ray Train registered in this run (0 if none yet): where a restarted
    worker group resumes, so its token stream can start there (Ray Train's checkpoint_manager_snapshot.json; the
    loop checks every batch's step, so a stale answer costs only skipped reading)."""
    from components.data.token_blocks import filesystem

    fs, root = filesystem(run_folder)
    try:
        with fs.open_input_stream(f"{root}/checkpoint_manager_snapshot.json") as f:
            results = json.loads(f.read())["checkpoint_results"]
        return max((int(r["metrics"]["step"]) for r in results), default=0)
    except (OSError, KeyError, TypeError, ValueError):
        return 0


def train_lm(init: dict, train: dict | TokenBlocks, val: dict, cfg: LMTrainConfig, stage: str, out_dir: str | Path,
             run_id: str | None = None, resume_from: str | Path | None = None) -> dict:
    """Run the LM loop on cfg.ray's Ray Train workers (continuing a resume point when given) and materialise the
    final checkpoint folder at out_dir. Returns the final metrics. train: token blocks on storage (pretraining),
    or in-memory rows {"inputs", "targets"} (fine-tuning), written to blocks for the run: one streamed path."""
    if isinstance(train, dict) and 0 < (n := train["inputs"].shape[0]) < cfg.batch_size:
        # Fewer rows than a global batch (a few fine-tuning dialogs): repeated to fill one, every step sees each.
        train = {k: v.repeat(-(-cfg.batch_size // n), 1) for k, v in train.items()}
    with scratch_blocks(cfg.ray, stage) if isinstance(train, dict) else nullcontext() as uri:
        blocks = write_blocks(tensor_chunks(train), uri, train["inputs"].shape[1]) if uri else train
        order, total = StreamOrder(cfg.batch_size, cfg.seed), total_steps(cfg, blocks.n_rows)
        order.steps_per_epoch(blocks)  # fewer rows than a batch: an error now, not in the workers
        start = json.loads((Path(resume_from) / "trainer_state/state.json").read_text())["step"] if resume_from else 0

        def datasets(run_folder: str) -> dict:  # at every worker-group start: from the latest resume point
            return {"train": lambda: stream_dataset(blocks, order, max(start, registered_step(run_folder)), total)}

        return train_to_folder(lm_train_loop, {"train": cfg, "init": init, "stage": stage, "run_id": run_id,
                                               "rows": blocks.n_rows},
                               {"val": val}, cfg.ray, stage, out_dir, resume_from, datasets)
