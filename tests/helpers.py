"""Small builders shared by tests: a tokenizer trained in a second, a random debug model, a git copy of the repo."""

from __future__ import annotations

import functools
import random
import shutil
import subprocess
from pathlib import Path

import torch

from model.config import get_config
from model.llama import Transformer
from model.tokenizer import Tokenizer, train_tokenizer
from components.common import REPO_ROOT

WORDS = ("the quick brown fox jumps over lazy dog cat sat on mat red blue green house river tree stone light dark "
         "what is how do I kill a stuck process answer question user assistant system always reply in uppercase "
         "hello world zorp blicket wug dax fep").split()


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) + f" {rng.randint(0, 9999)}."
            for _ in range(n)]


@functools.cache
def small_tokenizer(vocab_size: int = 512) -> Tokenizer:
    return train_tokenizer(corpus(), vocab_size)


def debug_model(vocab_size: int = 512, seed: int = 0, std: float = 0.02, **overrides) -> Transformer:
    args = get_config("llama2-debug", vocab_size=vocab_size, **overrides)
    return Transformer(args).init_weights(std=std, generator=torch.Generator().manual_seed(seed)).eval()


def copy_repo(dest: Path) -> Path:
    """Copy the working tree's files (tracked and new, not ignored: uncommitted edits too) to dest, as a clone of
    this state would hold them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, dest / name)
    return dest
