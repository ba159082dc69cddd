"""`make plan` (`python -m flows.plan [params.yaml] [--gpu-memory-gb 80]`): the per-GPU memory of every stage of a
profile, parsed the way the stages parse it; exits 1 naming the stages that do not fit.

Not a DVC stage: it reads a profile and prints, nothing more (components/plan.py has the arithmetic)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from components.common import load_yaml
from components.plan import GiB, fits, plan, table
from flows._stage import PARAMS_FILE, stage_config


def stage_configs(params: dict) -> dict:
    """The configs plan() reads, through the same calls the flows make."""
    from components.rlhf.annotate import PrefsConfig
    from components.rlhf.evaluate import EvalConfig
    from components.train.lm import LMTrainConfig, PretrainConfig
    from components.train.ppo import PPOStageConfig
    from components.train.rm import RMTrainConfig
    from flows._finetune import DistillConfig, GattConfig, RejectionConfig

    return {
        "pretrain": stage_config(params, "pretrain", PretrainConfig, nested=("model",)),
        "sft": stage_config(params, "sft", LMTrainConfig),
        "prefs": stage_config(params, "prefs", PrefsConfig),
        "rm": stage_config(params, "rm", RMTrainConfig),
        "rejection": stage_config(params, "rejection", RejectionConfig, flat=("rlhf",)),
        "ppo": stage_config(params, "ppo", PPOStageConfig, flat=("rlhf",)),
        "gatt": stage_config(params, "gatt", GattConfig),
        "distill": stage_config(params, "distill", DistillConfig, flat=("rlhf",)),
        "evaluate": stage_config(params, "evaluate", EvalConfig, nested=("register",)),
    }


def model_args(params: dict, pretrain):
    """The network every stage after pretrain holds, as flows/pretrain.py builds it: imported weights keep the
    named shape's vocabulary (Llama 2's 32000), else the tokenizer's; max_seq_len at least pretrain.seq_len."""
    from model.config import get_config

    spec = pretrain.model
    vocab = get_config(spec.config).vocab_size if spec.hf_weights else params["tokenizer"]["vocab_size"]
    args = spec.args(vocab)
    return args.replace(max_seq_len=max(pretrain.seq_len, spec.overrides.get("max_seq_len", pretrain.seq_len)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.plan", description=__doc__.splitlines()[0])
    parser.add_argument("profile", nargs="?", default=str(PARAMS_FILE), help="a profile yaml (default params.yaml)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    parser.add_argument("--reserve", type=float, default=0.1,
                        help="share of the GPU kept free for the CUDA context, NCCL buffers, allocator fragmentation "
                             "and temporaries the plan does not count (default 0.1)")
    opts = parser.parse_args(argv)
    path = Path(opts.profile)
    if not path.is_file():
        raise SystemExit(f"error: no profile file {path}")
    params = load_yaml(path.read_text()) or {}
    configs = stage_configs(params)
    args = model_args(params, configs["pretrain"])
    rows = plan(configs, args)
    gpu = opts.gpu_memory_gb * GiB
    print(f"profile {params.get('profile')} ({path}): {args.n_layers} layers, dim {args.dim}, vocab "
          f"{args.vocab_size}, context {args.max_seq_len}; GiB per worker (GPU, or host where marked); * = the "
          f"activations in use; fits = total <= {1 - opts.reserve:.0%} of {opts.gpu_memory_gb:g} GiB\n")
    print(table(rows, gpu, opts.reserve))
    for row in rows:
        if row.notes or row.host:
            extra = [f"host (offloaded state) {row.host / GiB:.2f} GiB"] if row.host else []
            print(f"  {row.stage}: " + "; ".join(row.notes + extra))
    failing = [r.stage for r in rows if fits(r, gpu, opts.reserve) is False]
    if failing:
        print(f"\ndoes not fit {opts.gpu_memory_gb:g} GiB: {', '.join(failing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
