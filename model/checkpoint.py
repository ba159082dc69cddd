"""Checkpoint folder: config.json (ModelArgs), model.safetensors (Meta names), tokenizer.model.

Self-describing: `load_checkpoint(path)` gives back a ready model and tokenizer from the folder alone. Writes go to
a temporary sibling folder renamed into place, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelArgs
from model.llama import Transformer
from model.tokenizer import Tokenizer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.model"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing files, corrupt, or inconsistent."""


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder next to `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint folder, atomically (a stage that passes its input on unchanged)."""
    load_args(src)  # fail early on something that is not a checkpoint
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return Path(dst)


def save_checkpoint(path: str | Path, model: Transformer, tokenizer: Tokenizer, extra_files: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write the checkpoint folder. extra_files: {name: bytes|str|dict} written beside (e.g. a training config)."""
    if tokenizer.vocab_size > model.args.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {model.args.vocab_size}")
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(model.args.to_dict(), indent=2) + "\n")
        tensors = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        tokenizer.save(tmp / TOKENIZER_FILE)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, dict):
                content = json.dumps(content, indent=2) + "\n"
            target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return Path(path)


def load_args(path: str | Path) -> ModelArgs:
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{path} is not a checkpoint folder: {CONFIG_FILE} is missing")
    try:
        return ModelArgs.from_dict(json.loads(config.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{config}: {exc}") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} is missing")
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or not a safetensors file: {exc}") from None


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a readable error for missing, unexpected or mis-shaped tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source} does not match its config: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict(state_dict)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    ) -> tuple[Transformer, Tokenizer]:
    """Model (eval mode, on device) and tokenizer from a checkpoint folder."""
    path = Path(path)
    args = load_args(path)
    try:
        tokenizer = Tokenizer.load(path / TOKENIZER_FILE)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    if tokenizer.vocab_size > args.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} ids, model vocab is {args.vocab_size}")
    with torch.device("meta"):
        model = Transformer(args)
    state_dict = load_state_dict(path)
    model = model.to_empty(device=device)
    load_into(model, state_dict, str(path / WEIGHTS_FILE))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer
