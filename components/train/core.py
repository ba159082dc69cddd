"""The training core every Ray Train loop shares (LM, reward model, PPO): optimizer, schedule, train-state save and
restore, reports with checkpoints, rank-0 logging, and the driver that runs a loop on Ray Train and materialises its
final checkpoint folder."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from components.cluster import REPO_ROOT, RayConfig, init_ray
from components.train import parallel
from model.checkpoint import TOKENIZER_FILE, atomic_dir, load_args, load_checkpoint, load_state_dict, save_checkpoint
from model.config import ModelArgs
from model.llama import Transformer
from model.tokenizer import Tokenizer


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
    """The module inside a DDP-style wrapper (anything with `.module`), else the model itself."""
    return getattr(model, "module", model)


def all_reduce_mean(value: float) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"  # nccl: GPU tensors
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def load_init(init: dict, meta: bool = False) -> tuple[Transformer, Tokenizer]:
    """init = {"checkpoint": path} or {"args": ModelArgs dict, "tokenizer": path, "seed": int} (fresh weights).
    meta: build the network on the meta device without weights (fsdp ranks other than 0; parallel.prepare)."""
    if "checkpoint" in init:
        if not meta:
            model, tokenizer = load_checkpoint(init["checkpoint"])
            return model.train(), tokenizer
        args, tokenizer = load_args(init["checkpoint"]), Tokenizer.load(Path(init["checkpoint"]) / TOKENIZER_FILE)
    else:
        args, tokenizer = ModelArgs.from_dict(init["args"]), Tokenizer.load(init["tokenizer"])
    if meta:
        return meta_model(args), tokenizer
    model = Transformer(args)
    model.init_weights(generator=torch.Generator().manual_seed(init.get("seed", 0)))
    return model.train(), tokenizer


def meta_model(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        return Transformer(args).train()


def save_train_state(folder: Path, trained: dict, tokenizer, state: dict, config, extra: dict | None = None,
                     final: bool = False) -> None:
    """Every rank calls this (under fsdp both kinds gather or write shards). trained: {name: (model, optimizer)},
    what the loop trains, the stage's own model first. A resume point: every model and optimizer state as it is
    sharded (parallel.save_resume_point). The final checkpoint: the first model's full weights gathered to rank 0 as
    our self-describing checkpoint folder (the stage's out). Both carry trainer_state/: the step (state.json), the
    stage's fully resolved config (config.json: defaults included, as logged to MLflow) and `extra` (the history)."""
    import json

    files = {"trainer_state/state.json": state, "trainer_state/config.json": asdict(config), **(extra or {})}
    model = next(iter(trained.values()))[0]
    if final:
        weights = parallel.full_state_dict(model)
        if dist.get_rank() == 0:
            plain = meta_model(unwrap(model).args)
            plain.load_state_dict(weights, assign=True)
            save_checkpoint(folder, plain, tokenizer, extra_files=files)
        return
    parallel.save_resume_point(folder, trained)
    if dist.get_rank() == 0:
        for name, content in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))


def restore_train_state(trained: dict, resume_from: str | None = None, extra=None) -> dict | None:
    """Resume from Ray Train's latest checkpoint of this run (a failure restart), else from the resume point
    `resume_from` (a checkpoint folder of an earlier run): every {name: (model, optimizer)} of `trained` resharded
    to this run's workers, and the state (step) with the metric history so far; None on a fresh start.
    extra(folder): reads what else the loop saved there (every rank calls it)."""
    import json

    import ray.train
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from:
        checkpoint = ray.train.Checkpoint.from_directory(resume_from)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        if not parallel.load_resume_point(folder, trained):  # the final checkpoint: training had ended
            model = next(iter(trained.values()))[0]
            set_model_state_dict(model, load_state_dict(folder), options=StateDictOptions(full_state_dict=True))
        state = json.loads((folder / "trainer_state" / "state.json").read_text())
        history = folder / "trainer_state" / "history.json"
        if extra is not None:
            extra(folder)
        return {**state, "history": json.loads(history.read_text()) if history.is_file() else []}


def report(metrics: dict, save=None) -> None:
    """ray.train.report from every rank, with the checkpoint that save(folder) writes there (every rank calls it:
    resume points hold each rank's shards, which Ray Train merges into one checkpoint)."""
    import ray.train

    if save is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        save(folder)
        written = folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if written else None)


class RankZeroLogger:
    """Rank 0 alone prints progress and sends metric curves to MLflow (batched); it keeps the whole history, which
    checkpoints carry as trainer_state/history.json (the stage's `dvc plots` curves).

    A resumed run (history restored from a resume point) sends MLflow what it lacks of that history (the crashed
    attempt may have died with entries unsent) and never a (metric, step) MLflow already has (the attempt may have
    sent steps past its last resume point): each step is in MLflow once."""

    def __init__(self, stage: str, run_id: str | None, tracking_uri: str | None, total_steps: int,
                 history: list[dict] | None = None):
        import ray.train

        self.is_main = ray.train.get_context().get_world_rank() == 0
        self.stage, self.run_id, self.uri, self.total = stage, run_id, tracking_uri, total_steps
        self.history: list[dict] = list(history or [])  # a resumed run continues the curves it had
        self.pending: list[dict] = list(self.history)
        self.sent: set[tuple[str, int]] = set()
        if self.is_main and run_id and tracking_uri and self.history:
            from components.track.tracking import logged_steps

            self.sent = logged_steps(run_id, {k for row in self.history for k in row if k != "step"}, tracking_uri)

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
        if self.is_main and self.run_id and self.uri and self.pending:
            from components.track.tracking import log_metric_series

            self.sent |= log_metric_series(self.run_id, self.pending, self.uri, skip=self.sent)
        self.pending = []


def worker_setup(config: dict):
    """What every loop does first on its Ray Train worker: torch threads = the worker's CPUs, the seed, the data the
    driver put in the object store. Returns (stage config, rank, world size, data)."""
    import ray
    import ray.train

    cfg = config["train"]
    torch.set_num_threads(max(1, int(round(cfg.ray.cpus_per_worker))))
    if cfg.seed is not None:  # PPO may run unseeded
        torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    return cfg, ctx.get_world_rank(), ctx.get_world_size(), ray.get(config["data"])


def storage_uri(cfg: RayConfig) -> str:
    """Ray Train's storage (checkpoints; data the workers read): a URI, or an absolute local path (created)."""
    storage = cfg.storage_path if "://" in cfg.storage_path else str((REPO_ROOT / cfg.storage_path).resolve())
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
    return storage


def run_trainer(loop, loop_config: dict, cfg: RayConfig, name: str, datasets: dict | None = None):
    """Run `loop(config)` on cfg.num_workers Ray Train workers; returns the ray.train.Result. datasets: Ray Datasets
    (or callables making them, called at each worker-group start), each given whole and in its order to every
    worker: the loop takes its rows (ray.train.get_dataset_shard)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    init_ray(cfg)
    storage = storage_uri(cfg)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep)),
        datasets=datasets, dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    return trainer.fit()


def train_to_folder(loop, loop_config: dict, data, cfg: RayConfig, stage: str, out_dir, resume_from=None,
                    datasets=None) -> dict:
    """Run a Ray Train loop (loop_config + the data, put in the object store once, and the tracking URI) whose final
    report carries a checkpoint; materialise that checkpoint at out_dir atomically (through Ray's storage, so it also
    works when the workers run on other nodes). datasets(run_folder): the run's Ray Datasets (run_trainer), given
    the run's folder in Ray's storage. Returns the final metrics."""
    import ray

    from components.track.tracking import tracking_uri

    init_ray(cfg)
    # resume_from: a resume-point folder of an earlier run (its sharded state reloads on any worker count); Ray
    # Train v2 has no resume_from_checkpoint, so the loop reads it (restore_train_state).
    loop_config = {**loop_config, "data": ray.put(data), "tracking_uri": tracking_uri(),
                   "resume_from": str(resume_from) if resume_from else None}
    name = f"{stage}-{int(time.time())}"
    result = run_trainer(loop, loop_config, cfg, name, datasets(f"{storage_uri(cfg)}/{name}") if datasets else None)
    if result.error:
        raise RuntimeError(f"{stage} training failed: {result.error}")
    with atomic_dir(out_dir) as tmp:
        result.checkpoint.to_directory(str(tmp))
    return dict(result.metrics)
