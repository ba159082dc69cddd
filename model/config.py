"""Model configuration: Meta's `ModelArgs`, the published Llama 2 shapes, and small ones for laptops and tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a Llama 2 network (field names follow Meta's params.json)."""

    dim: int = 4096  # model (residual stream) width
    n_layers: int = 32
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; None = n_heads (MHA)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # 1.3 for 70B
    hidden_dim: int | None = None  # explicit SwiGLU width (HF intermediate_size); overrides the rule above
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # context length: longer inputs are an error, never truncated
    head: str = "lm"  # "lm": next-token logits over the vocabulary; "scalar": one value per position (reward/value)

    def __post_init__(self) -> None:
        checks = [
            (self.dim > 0 and self.n_layers > 0 and self.vocab_size > 0, "dim, n_layers and vocab_size must be > 0"),
            (self.n_heads > 0 and self.dim % self.n_heads == 0, f"dim {self.dim} must divide into n_heads {self.n_heads}"),
            (self.kv_heads > 0 and self.n_heads % self.kv_heads == 0,
             f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.kv_heads}"),
            (self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for rotary embeddings"),
            (self.max_seq_len > 0, "max_seq_len must be > 0"),
            (self.head in ("lm", "scalar"), f"head must be 'lm' or 'scalar', got {self.head!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid ModelArgs: {message}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def output_dim(self) -> int:
        return self.vocab_size if self.head == "lm" else 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelArgs keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


# Published shapes (Touvron et al. 2023, table 1 and Meta's params.json files).
CONFIGS: dict[str, ModelArgs] = {
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    # Small flavours, same architecture. ~125M: the GPU benchmark size.
    "llama2-125m": ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32000, max_seq_len=2048),
    # ~6.5M: laptop pretraining and the CPU benchmark (dim 256, 6 layers, hidden 704, vocab 4096).
    "llama2-6m": ModelArgs(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=32,
                           max_seq_len=512),
    # ~0.2M: unit tests.
    "llama2-debug": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16,
                              max_seq_len=128),
}


def get_config(name: str, **overrides) -> ModelArgs:
    """A named configuration, optionally with some fields replaced (e.g. vocab_size from the tokenizer)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}")
    return CONFIGS[name].replace(**overrides) if overrides else CONFIGS[name]


@dataclass(frozen=True)
class ModelSpec:
    """params `model`: which network to build (a named configuration with overrides) or import."""

    config: str = "llama2-6m"  # a CONFIGS name
    overrides: dict = dataclasses.field(default_factory=dict)  # ModelArgs fields replaced
    hf_weights: str | None = None  # a LlamaForCausalLM folder: its weights and tokenizer replace training from scratch

    def args(self, vocab_size: int) -> ModelArgs:
        return get_config(self.config, **{**self.overrides, "vocab_size": vocab_size})
