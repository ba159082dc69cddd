"""Hugging Face interop: import a `LlamaForCausalLM` folder, export ours to that layout.

Meta's checkpoints rotate consecutive pairs of each head's q/k features; HF's rotate the two halves. Converting
permutes the rows of wq and wk (as transformers' convert_llama_weights_to_hf.py does), nothing else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.chat import SAMPLING_DEFAULTS
from model.checkpoint import TOKENIZER_FILE, CheckpointError, atomic_dir, load_checkpoint, save_checkpoint
from model.config import ModelArgs
from model.hf_tokenizer import tokenizer_config_json, tokenizer_json
from model.llama import Transformer
from model.tokenizer import Tokenizer

# Meta name -> HF name; "{i}" is the layer index.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def _meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head, interleaved pairs (x0 y0 x1 y1 ...) -> halves (x0 x1 ... y0 y1 ...)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config_to_args(config: dict, max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs from an HF LlamaConfig dict; refuses features our network does not implement."""
    if config.get("model_type", "llama") != "llama":
        raise CheckpointError(f"not a Llama checkpoint: model_type is {config.get('model_type')!r}")
    unsupported = {
        "hidden_act": config.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(config.get("attention_bias")),
        "mlp_bias": bool(config.get("mlp_bias")),
    }
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        unsupported["rope scaling"] = True
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim * config["num_attention_heads"] != config["hidden_size"]:
        unsupported["head_dim"] = True
    if any(unsupported.values()):
        raise CheckpointError(f"unsupported Llama features: {[k for k, v in unsupported.items() if v]}")
    return ModelArgs(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads"), vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        max_seq_len=max_seq_len or config.get("max_position_embeddings", 4096),
    )


def args_to_hf_config(args: ModelArgs, bos_id: int = 1, eos_id: int = 2) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None, "torch_dtype": "float32",
        "dtype": "float32", "use_cache": True,
    }


def meta_to_hf_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state_dict.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = tensor
            continue
        _, layer, rest = name.split(".", 2)
        if rest == "attention.wq.weight":
            tensor = _meta_to_hf_rows(tensor, args.n_heads)
        elif rest == "attention.wk.weight":
            tensor = _meta_to_hf_rows(tensor, args.kv_heads)
        out[f"model.layers.{layer}.{_LAYER_NAMES[rest]}"] = tensor
    return out


def hf_to_meta_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    to_meta_top = {v: k for k, v in _TOP_NAMES.items()}
    to_meta_layer = {v: k for k, v in _LAYER_NAMES.items()}
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints carry
            continue
        if name in to_meta_top:
            out[to_meta_top[name]] = tensor
            continue
        parts = name.split(".", 3)  # model, layers, i, rest
        if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in to_meta_layer:
            raise CheckpointError(f"unexpected tensor in HF checkpoint: {name}")
        rest = to_meta_layer[parts[3]]
        if rest == "attention.wq.weight":
            tensor = _hf_to_meta_rows(tensor, args.n_heads)
        elif rest == "attention.wk.weight":
            tensor = _hf_to_meta_rows(tensor, args.kv_heads)
        out[f"layers.{parts[2]}.{rest}"] = tensor
    if "output.weight" not in out and "tok_embeddings.weight" in out:  # tied HF model: untie
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                              "(pickled pytorch_model.bin is not loaded, by design)")
    state_dict = {}
    for name in files:
        try:
            state_dict.update(load_file(folder / name))
        except Exception as exc:
            raise CheckpointError(f"{folder / name} is missing or corrupt: {exc}") from None
    return state_dict


def import_hf(hf_folder: str | Path, out: str | Path | None = None, max_seq_len: int | None = None,
              ) -> tuple[Transformer, Tokenizer | None]:
    """Load an HF LlamaForCausalLM folder as our model (and tokenizer.model if present); optionally save it as our
    checkpoint folder at `out` (which then requires tokenizer.model)."""
    hf_folder = Path(hf_folder)
    config_path = hf_folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{hf_folder}: config.json is missing")
    args = hf_config_to_args(json.loads(config_path.read_text()), max_seq_len)
    state_dict = hf_to_meta_state_dict(_read_hf_weights(hf_folder), args)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cpu")
    from model.checkpoint import load_into
    load_into(model, {k: v.float() for k, v in state_dict.items()}, str(hf_folder))
    tokenizer = Tokenizer.load(hf_folder / TOKENIZER_FILE) if (hf_folder / TOKENIZER_FILE).is_file() else None
    if out is not None:
        if tokenizer is None:
            raise CheckpointError(f"{hf_folder}: tokenizer.model is missing; a checkpoint folder needs one")
        save_checkpoint(out, model, tokenizer)
    return model.eval(), tokenizer


def export_hf(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write our checkpoint folder as an HF LlamaForCausalLM folder (config.json, model.safetensors,
    tokenizer.model, tokenizer.json, tokenizer_config.json with the chat template, generation_config.json)."""
    model, tokenizer = load_checkpoint(checkpoint)
    if model.args.head != "lm":
        raise CheckpointError(f"{checkpoint} has a {model.args.head} head; only language models export to HF")
    hf_state = meta_to_hf_state_dict(model.state_dict(), model.args)
    hf_state = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in hf_state.items()}
    config = args_to_hf_config(model.args, tokenizer.bos_id, tokenizer.eos_id)
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    with atomic_dir(out) as tmp:
        save_file(hf_state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(  # Llama 2 chat's sampling defaults, as Meta's
            {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "do_sample": True,
             **SAMPLING_DEFAULTS}, indent=2) + "\n")
        shutil.copyfile(Path(checkpoint) / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        # tokenizer.json + tokenizer_config.json: AutoTokenizer then prepends BOS, as our model was trained (without
        # it lm_eval would score without BOS), and apply_chat_template gives model.chat's prompt ids (vLLM).
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokenizer)) + "\n")
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            tokenizer_config_json(tokenizer, model.args.max_seq_len), indent=2) + "\n")
    return Path(out)
