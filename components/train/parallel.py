"""How a training loop's model is spread over its Ray Train workers (`ray.strategy`), and how its train state is
saved and restored.

ddp   a full replica per worker (Ray Train's prepare_model: DistributedDataParallel); gradients all-reduced.
fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`) on every transformer block, then the root: parameters, gradients
      and AdamW state are sharded over the workers, and each block's full weights exist only during its own forward
      and backward. Every rank but 0 builds the model on the meta device; rank 0's full weights are broadcast into
      the shards (`set_model_state_dict(..., broadcast_from_rank0=True)`), so no rank but one ever holds a full copy.
      On GPU, a MixedPrecisionPolicy computes in bf16 with fp32 master weights and fp32 gradient reductions.
      Frozen models (PPO's reference and reward models: `prepare_frozen`) are sharded the same way, in bf16 on GPU.
      Decoding gathers a trained model's full weights once into a plain copy (`gathered`), or runs through the
      shards in lock step (`all_finished`), where a full copy does not fit.

Resume points go through torch.distributed.checkpoint: every rank writes its own shards into its own folder, Ray
Train merges the ranks' folders into one checkpoint, and loading reshards to the worker count of the run that loads
(2 workers -> 1 works). The final checkpoint is consolidated instead: full weights gathered to rank 0, written as the
self-describing checkpoint folder the later stages, the registry and the server read.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

RESUME_DIR = "trainer_state/dcp"  # the sharded model + optimizer state inside a resume-point checkpoint


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def materialises(strategy: str, rank: int) -> bool:
    """Whether this rank builds the model with real weights (the others build it on the meta device)."""
    return strategy == "ddp" or rank == 0


def prepare(model: nn.Module, ray_cfg, device: torch.device, rank: int) -> nn.Module:
    """The model placed for training under ray_cfg.strategy. Under fsdp, `model` is real on rank 0 and on the meta
    device elsewhere (see `materialises`)."""
    if ray_cfg.strategy == "ddp":
        import ray.train.torch

        return ray.train.torch.prepare_model(model)
    return _shard(model, ray_cfg, device, rank, train=True)


def prepare_frozen(model: nn.Module, ray_cfg, device: torch.device, rank: int) -> nn.Module:
    """A model that is only evaluated (PPO's reference policy and reward models): no gradients, no optimizer state,
    bf16 weights on GPU. Under fsdp it is sharded over the same workers as the trained models (2 bytes per parameter
    / workers on GPU, one block gathered at a time in its forward); under ddp each worker holds a plain copy."""
    model.requires_grad_(False).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else None
    if ray_cfg.strategy == "ddp":
        return model.to(device=device, dtype=dtype)
    return _shard(model, ray_cfg, device, rank, train=False, dtype=dtype)


def _shard(model: nn.Module, ray_cfg, device: torch.device, rank: int, train: bool,
           dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 on every block, then the root; rank 0's full weights (cast to dtype) broadcast into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    model.kernels.cache_weights = False  # see Kernels.cache_weights
    full = {k: v.to(dtype or v.dtype) for k, v in model.state_dict().items()} if rank == 0 else {}
    if rank == 0:
        model = model.to_empty(device="meta")  # `full` keeps the weights; the shards are filled from it below
    if dtype is not None:
        model = model.to(dtype)  # on the meta device: the shards are allocated in dtype
    if train and ray_cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "offload_policy": CPUOffloadPolicy() if ray_cfg.cpu_offload else OffloadPolicy()}
    if train and device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    model.to_empty(device="cpu" if ray_cfg.cpu_offload else device)
    # Keys as the unwrapped model names them: the distributed state-dict API drops the checkpoint wrapper's prefix.
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


@contextlib.contextmanager
def gathered(model: nn.Module, device: torch.device):
    """The model to decode with: under fsdp its full weights gathered ONCE into a plain copy on this rank (bf16 on
    GPU), freed on exit; every rank enters together. Decoding through the sharded model would all-gather every block
    for every token (the Llama 2 paper saw ~20x slower generation under FSDP until it consolidated the weights
    first). Under ddp: the replica itself."""
    if not is_fsdp(model):
        yield getattr(model, "module", model)
        return
    from model.llama import Transformer

    dtype = torch.bfloat16 if device.type == "cuda" else None
    with torch.device("meta"):
        plain = Transformer(model.args)
    full = {}
    for name, param in model.named_parameters():  # one parameter's fp32 all-gather alive at a time
        whole = param.detach().to(device).full_tensor()
        full[name.replace("_checkpoint_wrapped_module.", "")] = whole.to(dtype or whole.dtype)
    plain.load_state_dict(full, assign=True)
    plain.kernels.cache_weights = device.type != "cuda"  # fused QKV/W13 copies would add ~90% of the weights again
    del full
    try:
        yield plain.eval()
    finally:
        del plain


def all_finished(done: bool) -> bool:
    """Lock-step decoding through a sharded model (generate's `sync`): every rank runs the same decode steps (each
    step's forward all-gathers weights on all ranks), stopping once every rank's rows are done."""
    flag = torch.tensor([0 if done else 1], dtype=torch.int32,
                        device=f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def grad_sync(model: nn.Module, sync: bool):
    """Gradient accumulation: reduce gradients only on the last micro-batch of a step."""
    if sync:
        return contextlib.nullcontext()
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)
        return _resync(model)
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


@contextlib.contextmanager
def _resync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under fsdp


def local_state_bytes(model: nn.Module, optimizer) -> int:
    """Bytes of training state this worker holds: its parameters, as many again for their gradients, and its AdamW
    moments (the local shards under fsdp, everything under ddp)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).nbytes for p in model.parameters())
    moments = sum(local(v).nbytes for s in optimizer.state.values() for v in s.values()
                  if torch.is_tensor(v) and v.dim() > 0)
    return 2 * params + moments


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights on CPU, gathered to rank 0 (every rank must call this; the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_fsdp(model):
        return {k: v.detach().cpu() for k, v in getattr(model, "module", model).state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_resume_point(folder: Path, trained: dict) -> None:
    """Each trained model and its optimizer ({name: (model, optimizer)}), sharded as they are, into
    folder/trainer_state/dcp (every rank calls this)."""
    import torch.distributed.checkpoint as dcp

    (folder / RESUME_DIR).mkdir(parents=True, exist_ok=True)
    dcp.save(_sharded_state(trained), checkpoint_id=str(folder / RESUME_DIR))


def load_resume_point(folder: Path, trained: dict) -> bool:
    """Load what save_resume_point wrote, resharded to this run's workers; False if the folder has none (a final,
    consolidated checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not (folder / RESUME_DIR).is_dir():
        return False
    state = _sharded_state(trained)
    dcp.load(state, checkpoint_id=str(folder / RESUME_DIR))
    for name, (model, optimizer) in trained.items():
        set_state_dict(model, optimizer, model_state_dict=state[name], optim_state_dict=state[f"{name}.optim"])
    return True


def _sharded_state(trained: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = {}
    for name, (model, optimizer) in trained.items():
        state[name], state[f"{name}.optim"] = get_state_dict(model, optimizer)
    return state
