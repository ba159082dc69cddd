"""The GPU engine: Ray Serve LLM (`ray.serve.llm`, vLLM underneath) serving the champion's HF export, autoscaled, with
prefix caching. For the GPU profiles; the CPU server is components/serve/app.py.

    make serve-llm                 # = serve run infra/serve_llm.yaml (needs `pip install '.[vllm]'`: CUDA torch)

The builder resolves the model (models:/llama2-chat@champion by default, or a checkpoint folder), exports it once to
HF's layout in bf16 (model/hf.py: weights, tokenizer.json and the Llama 2 chat template, so vLLM's prompt ids are
model.chat's) into a cache folder, and serves that folder under the OpenAI API with the profile's `serve_llm`
section. Every replica loads the export from that path: on a multi-node cluster put `export_dir` on storage every GPU
node mounts, or upload the export and give its s3:// or gs:// URI as `model_source`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components.common import REPO_ROOT, config_from_dict, load_yaml

MODEL_URI_ENV = "LLAMA2_MODEL_URI"  # as infra/serve.yaml: wins over args.model_uri


@dataclass
class LLMServeConfig:
    """params section `serve_llm` (one per profile)."""
    accelerator_type: str | None = None  # Ray's accelerator type of the GPU nodes (H100, A100-80G, ...); null: any
    tensor_parallel_size: int = 1  # GPUs per replica: 1 holds a bf16 7B or 13B; a bf16 70B (128 GiB) needs 8
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: int = 32  # per replica, before autoscaling adds one (vLLM batches them continuously)
    max_model_len: int | None = None  # context served (prompt + answer); null: the model's max_seq_len

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"serve_llm: need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, "
                             f"{self.max_replicas}")
        if self.tensor_parallel_size < 1 or self.target_ongoing_requests < 1 or (self.max_model_len or 1) < 1:
            raise ValueError("serve_llm: tensor_parallel_size, target_ongoing_requests and max_model_len must be >= 1")


@dataclass
class LLMAppArgs:
    """The builder's args (infra/serve_llm.yaml)."""
    params: str = "params.yaml"  # the profile to read `serve_llm` from (relative to the repo)
    model_uri: str = "models:/llama2-chat@champion"  # or a checkpoint folder; $LLAMA2_MODEL_URI wins
    model_name: str = "llama2-chat"  # the OpenAI `model` clients ask for
    tracking_uri: str | None = None  # MLflow; None: $MLFLOW_TRACKING_URI or the repo's sqlite store
    export_dir: str | None = None  # where HF exports are cached; None: $LLAMA2_SERVE_CACHE or the temp dir
    model_source: str | None = None  # an existing HF export (path or s3://, gs:// URI): no resolve, no export


def load_serve_config(params_path: str | Path) -> LLMServeConfig:
    path = Path(params_path) if Path(params_path).is_absolute() else REPO_ROOT / params_path
    params = load_yaml(path.read_text()) or {}
    return config_from_dict(LLMServeConfig, params.get("serve_llm"), "serve_llm")


def export_for_serving(checkpoint: Path, export_dir: str | Path | None = None) -> Path:
    """The checkpoint's bf16 HF export, made once per checkpoint content (keyed by path, weights size and mtime)."""
    from model.checkpoint import WEIGHTS_FILE
    from model.hf import export_hf
    import torch

    weights = (checkpoint / WEIGHTS_FILE).stat()
    key = hashlib.sha1(f"{checkpoint.resolve()}:{weights.st_size}:{weights.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(export_dir or os.environ.get("LLAMA2_SERVE_CACHE")  # as resolve.py's registry downloads
                or Path(tempfile.gettempdir()) / "llama2-serve-models")
    target = root / f"{checkpoint.name}-hf-bf16-{key}"
    if not (target / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        export_hf(checkpoint, target, torch.bfloat16)  # atomic: a crash leaves no half-written folder
    return target


def llm_config(cfg: LLMServeConfig, model_source: str, model_name: str, max_seq_len: int | None) -> dict:
    """The LLMConfig (as a dict) for Ray Serve LLM."""
    max_model_len = cfg.max_model_len or max_seq_len  # None (a given model_source): vLLM reads config.json's
    if max_seq_len and max_model_len > max_seq_len:
        raise ValueError(f"serve_llm.max_model_len {max_model_len} exceeds the model's max_seq_len {max_seq_len}")
    return {
        "model_loading_config": {"model_id": model_name, "model_source": model_source},
        "accelerator_type": cfg.accelerator_type,
        "deployment_config": {"autoscaling_config": {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests}},
        "engine_kwargs": {"max_model_len": max_model_len, "tensor_parallel_size": cfg.tensor_parallel_size,
                          "dtype": "bfloat16", "enable_prefix_caching": True},
    }


def resolve_llm_config(args: LLMAppArgs) -> dict:
    """Profile + model -> the LLMConfig dict: resolves and exports the model unless args.model_source is given."""
    cfg = load_serve_config(args.params)
    if args.model_source:
        return llm_config(cfg, args.model_source, args.model_name, None)
    from components.serve.resolve import resolve_checkpoint

    checkpoint = resolve_checkpoint(os.environ.get(MODEL_URI_ENV) or args.model_uri, args.tracking_uri,
                                    args.export_dir)
    max_seq_len = json.loads((checkpoint / "config.json").read_text())["max_seq_len"]
    return llm_config(cfg, str(export_for_serving(checkpoint, args.export_dir)), args.model_name, max_seq_len)


def build_app(args: dict | None = None):
    """Ray Serve application builder (`serve run infra/serve_llm.yaml`): the OpenAI app of ray.serve.llm."""
    parsed = config_from_dict(LLMAppArgs, args, "serve_llm app args")
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as exc:
        raise ImportError(f"Ray Serve LLM needs vLLM: pip install '.[vllm]' on the GPU nodes ({exc})") from None
    config = resolve_llm_config(parsed)
    return build_openai_app({"llm_configs": [LLMConfig(**config)]})


if __name__ == "__main__":  # the LLMConfig the profile gives, without vLLM: python -m components.serve.llm [key=value]
    import sys

    cli = config_from_dict(LLMAppArgs, dict(a.split("=", 1) for a in sys.argv[1:]), "command line")
    print(json.dumps(resolve_llm_config(cli), indent=2))
