"""The one language-model training loop, run by Ray Train workers.

Pretraining, SFT, rejection-sampling fine-tuning, Ghost Attention and safety distillation differ only in their data
(packed token rows with IGNORE_INDEX where there is no loss) and their starting checkpoint. The loop reads top to
bottom: lr -> eval -> micro-steps -> clip -> step -> log -> checkpoint. The pieces the reward-model and PPO trainers
share (optimizer, schedule, checkpoint save/restore, rank-0 logging) are module functions here.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model.checkpoint import load_checkpoint, load_into, save_checkpoint
from model.config import ModelArgs
from model.llama import Transformer, compile_enabled
from model.loss import IGNORE_INDEX
from model.tokenizer import Tokenizer


@dataclass(frozen=True)
class LMTrainConfig:
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
    bf16: bool = True  # bf16 autocast (CPU with AVX512-BF16/AMX, or GPU)
    # torch.compile the model's forward and backward: llama2-6m on 2 cores trains ~20-30% faster in bf16 (~7% in
    # fp32) but the first step costs 20-36 s, and again for evaluation's no-grad forward: a win from some
    # hundreds of steps on, not for the short stages of the CI and tiny profiles. $LLAMA2_COMPILE=0 turns it off.
    compile: bool = False
    eval_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 200  # steps between Ray Train checkpoints (resume points)
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Data: packed rows (inputs, targets), both (N, T) int64.

def pack_documents(docs: list[list[int]], seq_len: int, bos_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    """Concatenate <s> doc </s> for every document into one stream, cut into rows of seq_len next-token pairs."""
    stream = []
    for doc in docs:
        stream.extend([bos_id, *doc, eos_id])
    n_rows = (len(stream) - 1) // seq_len
    if n_rows == 0:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than one sequence of {seq_len}")
    data = torch.tensor(stream[:n_rows * seq_len + 1], dtype=torch.long)
    return {"inputs": data[:-1].view(n_rows, seq_len), "targets": data[1:].view(n_rows, seq_len)}


def pack_examples(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict:
    """Pack (tokens, loss_mask) examples greedily into rows of seq_len + 1 tokens; a token is a target only where
    its mask is 1. Examples longer than a row are dropped and counted (never cut: a cut answer teaches nothing)."""
    rows, row, mask, dropped = [], [], [], 0
    for tokens, loss_mask in examples:
        if len(tokens) > seq_len + 1:
            dropped += 1
            continue
        if len(row) + len(tokens) > seq_len + 1:
            rows.append((row, mask))
            row, mask = [], []
        row, mask = row + list(tokens), mask + list(loss_mask)
    if row:
        rows.append((row, mask))
    if not rows:
        raise ValueError(f"no example fits in a sequence of {seq_len} tokens ({dropped} dropped)")
    inputs = torch.full((len(rows), seq_len + 1), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len + 1), IGNORE_INDEX, dtype=torch.long)
    for i, (tokens, loss_mask) in enumerate(rows):
        inputs[i, :len(tokens)] = torch.tensor(tokens)
        targets[i, :len(tokens)] = torch.where(torch.tensor(loss_mask, dtype=torch.bool), torch.tensor(tokens),
                                               IGNORE_INDEX)
    return {"inputs": inputs[:, :-1].contiguous(), "targets": targets[:, 1:].contiguous(), "dropped": dropped}


def split_validation(data: dict, val_fraction: float, seed: int) -> tuple[dict, dict]:
    n = data["inputs"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(n * val_fraction)) if n > 1 else 0
    pick = lambda idx: {"inputs": data["inputs"][idx], "targets": data["targets"][idx]}  # noqa: E731
    return pick(order[n_val:]), pick(order[:n_val])


# ---------------------------------------------------------------------------------------------------------------
# Pieces shared by the LM, reward-model and PPO loops.

def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas, eps: float):
    """AdamW; no weight decay on norms (1-D parameters), as is usual for Llama."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def cosine_lr(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def all_reduce_mean(value: float) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def load_init(init: dict) -> tuple[Transformer, Tokenizer]:
    """init = {"checkpoint": path} or {"args": ModelArgs dict, "tokenizer": path, "seed": int} (fresh weights)."""
    if "checkpoint" in init:
        model, tokenizer = load_checkpoint(init["checkpoint"])
        return model.train(), tokenizer
    model = Transformer(ModelArgs.from_dict(init["args"]))
    model.init_weights(generator=torch.Generator().manual_seed(init.get("seed", 0)))
    return model.train(), Tokenizer.load(init["tokenizer"])


def save_train_state(folder: Path, model, tokenizer, optimizer, state: dict, extra: dict | None = None) -> None:
    """Our checkpoint folder plus trainer_state/ (optimizer tensors via torch.save, loaded with weights_only)."""
    save_checkpoint(folder, unwrap(model), tokenizer, extra_files={"trainer_state/state.json": state, **(extra or {})})
    torch.save(optimizer.state_dict(), folder / "trainer_state" / "optimizer.pt")


def restore_train_state(model, optimizer) -> dict | None:
    """Resume from Ray Train's latest checkpoint after a failure restart; returns its state or None."""
    import ray.train

    from model.checkpoint import load_state_dict

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    import json

    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        load_into(unwrap(model), load_state_dict(folder), str(folder))
        optimizer.load_state_dict(torch.load(folder / "trainer_state" / "optimizer.pt", weights_only=True))
        return json.loads((folder / "trainer_state" / "state.json").read_text())


def report(metrics: dict, save=None) -> None:
    """ray.train.report from every rank; rank 0 attaches a checkpoint written by save(folder)."""
    import ray.train

    if save is not None and ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "checkpoint"
            save(folder)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report(metrics)


class RankZeroLogger:
    """Rank 0 alone prints progress and sends metric curves to MLflow (batched); it keeps the whole history, which
    checkpoints carry as trainer_state/history.json (the stage's `dvc plots` curves)."""

    def __init__(self, stage: str, run_id: str | None, tracking_uri: str | None, total_steps: int):
        import ray.train

        self.is_main = ray.train.get_context().get_world_rank() == 0
        self.stage, self.run_id, self.total = stage, run_id, total_steps
        self.pending: list[dict] = []
        self.history: list[dict] = []
        if self.is_main and run_id and tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)

    def log(self, step: int, metrics: dict, flush: bool = False) -> None:
        if not self.is_main:
            return
        self.pending.append({"step": step, **metrics})
        self.history.append({"step": step, **metrics})
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"[{self.stage}] step {step}/{self.total}  {shown}", flush=True)
        if flush or len(self.pending) >= 20:
            self.flush()

    def history_file(self) -> dict:
        """extra_files entry for save_train_state."""
        import json

        return {"trainer_state/history.json": json.dumps(self.history)}

    def flush(self) -> None:
        if self.is_main and self.run_id and self.pending:
            from components.tracking import log_metric_series

            log_metric_series(self.run_id, self.pending)
        self.pending = []


def set_threads(cpus_per_worker: float) -> None:
    torch.set_num_threads(max(1, int(round(cpus_per_worker))))


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
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            total += model(inputs, targets=targets).item() * n
        count += n
    model.train()
    return all_reduce_mean(total / max(count, 1))


def lm_train_loop(config: dict) -> None:
    """Ray Train worker entry point. config: train (LMTrainConfig dict), init, data (ObjectRef of
    {"train": {...}, "val": {...}}), stage, run_id, tracking_uri, cpus_per_worker."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = LMTrainConfig(**config["train"])
    set_threads(config.get("cpus_per_worker", 1))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    data = ray.get(config["data"])
    train, val = data["train"], data["val"]
    model, tokenizer = load_init(config["init"])
    if compile_enabled(cfg.compile):
        model.compile()  # in place: state-dict keys, checkpoints and DDP wrapping stay as they are
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)

    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {world} workers")
    n_rows, local_batch = train["inputs"].shape[0], cfg.batch_size // world
    steps_per_epoch = max(1, n_rows // cfg.batch_size)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    state = restore_train_state(model, optimizer) or {"step": 0}
    logger = RankZeroLogger(config["stage"], config.get("run_id"), config.get("tracking_uri"), total)

    def save(folder: Path) -> None:
        save_train_state(folder, model, tokenizer, optimizer, {"step": step + 1, "config": asdict(cfg)},
                         logger.history_file())

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
            sync = i == len(micro) - 1 or not hasattr(model, "no_sync")
            ctx_sync = model.no_sync() if not sync else torch.enable_grad()
            with ctx_sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = model(inputs, targets=targets) / len(micro)
            loss.backward()
            loss_sum += loss.item()
            tokens_seen += inputs.numel() * world
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == total - 1:
            elapsed = time.perf_counter() - t0
            logger.log(step, {"train_loss": all_reduce_mean(loss_sum), "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens_seen / elapsed})
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            report({"step": step + 1}, save)
    final = {"step": total}
    if val["inputs"].shape[0]:
        final["val_loss"] = evaluate_loss(model, val, cfg.micro_batch_size, device, cfg.bf16)
        logger.log(total, {"val_loss": final["val_loss"]})
    logger.flush()
    step = total - 1
    report(final, save)


def train_lm(init: dict, train: dict, val: dict, cfg: LMTrainConfig, ray_cfg, stage: str, out_dir: str | Path,
             run_id: str | None = None) -> dict:
    """Run the LM loop on Ray Train and materialise the final checkpoint folder at out_dir. Returns final metrics."""
    import ray

    from components.ray_utils import init_ray, train_to_folder
    from components.tracking import tracking_uri

    init_ray(ray_cfg)
    return train_to_folder(lm_train_loop, {
        "train": asdict(cfg), "init": init, "data": ray.put({"train": train, "val": val}), "stage": stage,
        "run_id": run_id, "tracking_uri": tracking_uri(), "cpus_per_worker": ray_cfg.cpus_per_worker,
    }, ray_cfg, stage, out_dir)
