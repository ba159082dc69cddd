"""The Llama 2 network (Touvron et al. 2023), in one file, with Meta's weight names.

Decoder-only transformer: pre-norm RMSNorm, SwiGLU feed-forward, rotary embeddings, grouped-query attention, no
biases, untied output head. Which kernel each product and attention takes (oneDNN on CPU, SDPA, the compiled
decoding paths) is model.kernels' choice: a Transformer owns a Kernels object and hands it to its layers.
Shapes in comments: B batch, T query length, S key length, H query heads, K kv heads, D head dim, C model dim.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelArgs
from model.loss import linear_cross_entropy
from model.kernels import Kernels, attention


class ContextLengthError(ValueError):
    """An input longer than the model's context length (max_seq_len)."""


def precompute_freqs_cis(head_dim: int, end: int, theta: float, device=None) -> torch.Tensor:
    """Rotary frequencies as unit complex numbers, (end, head_dim/2), computed in fp32 as Meta does."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, T, H, D) by freqs_cis (B or 1, T, 1, D/2).

    freqs_cis complex: one complex multiply, the fewest eager ops. Real (..., D/2, 2) holding (cos, sin): the same
    rotation spelled out, for torch.compile (inductor has no complex kernels) which fuses it into one loop.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if freqs_cis.is_complex():
        return torch.view_as_real(torch.view_as_complex(pairs) * freqs_cis).flatten(-2).type_as(x)
    (re, im), (cos, sin) = pairs.unbind(-1), freqs_cis.unbind(-1)
    return torch.stack((re * cos - im * sin, re * sin + im * cos), -1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32 (as Meta and HF do), scale in the input dtype.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class KVCache:
    """Preallocated keys and values, one (B, K, max_len, D) tensor each per layer, written in place."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > args.max_seq_len:
            raise ContextLengthError(f"KV cache of {max_len} positions exceeds the context length {args.max_seq_len}")
        shape = (batch_size, args.kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]

    def rows(self, n: int, first_slot: int = 0) -> "KVCache":
        """The first n rows from slot first_slot on, sharing this cache's storage (a batch that grows and shrinks
        inside one allocation; slots no row attends to any more left out of attention)."""
        view = object.__new__(KVCache)
        view.k, view.v = [k[:n, :, first_slot:] for k in self.k], [v[:n, :, first_slot:] for v in self.v]
        return view

    def update(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at positions [start, start+T) and return the keys and values to attend to.

        start an int: those up to start+T. start a (1,) tensor (one token, T=1): all max_len slots, so shapes do not
        change from step to step (what torch.compile needs to capture the step once); the caller masks the slots
        after start.
        """
        if isinstance(start, torch.Tensor):
            self.k[layer].index_copy_(2, start, k)
            self.v[layer].index_copy_(2, start, v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, kernels: Kernels):
        super().__init__()
        self.layer_id, self.kernels = layer_id, kernels
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def fused_qkv(self) -> torch.Tensor:
        return self.kernels.fused_weight(self, "_wqkv", (self.wq, self.wk, self.wv))  # inference's one QKV product

    def forward(self, x, freqs_cis, attn_mask=None, cache: KVCache | None = None, start_pos: int = 0):
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        linear = self.kernels.linear
        if torch.is_grad_enabled() or not self.kernels.cache_weights:  # no cache: a concatenation per call costs more
            q, k, v = linear(x, self.wq.weight), linear(x, self.wk.weight), linear(x, self.wv.weight)
        else:
            q, k, v = linear(x, self.fused_qkv()).split((H * D, K * D, K * D), dim=-1)
        q = apply_rotary_emb(q.view(B, T, H, D), freqs_cis)
        k = apply_rotary_emb(k.view(B, T, K, D), freqs_cis)
        k, v = k.transpose(1, 2), v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)  # (B, K, S, D)
        y = attention(q, k, v, attn_mask, single_query=T == 1 and cache is not None)  # (B, T, H, D)
        return linear(y.reshape(B, T, H * D), self.wo.weight)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def fused_w13(self) -> torch.Tensor:
        return self.kernels.fused_weight(self, "_w13", (self.w1, self.w3))  # inference's one W1/W3 product

    def forward(self, x):
        linear = self.kernels.linear
        if torch.is_grad_enabled() or not self.kernels.cache_weights:
            gate, up = linear(x, self.w1.weight), linear(x, self.w3.weight)
        else:
            gate, up = linear(x, self.fused_w13()).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.w2.weight)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, kernels: Kernels):
        super().__init__()
        self.attention = Attention(args, layer_id, kernels)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, kernels)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs_cis, attn_mask=None, cache=None, start_pos=0):
        h = x + self.attention(self.attention_norm(x), freqs_cis, attn_mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.kernels = Kernels()  # kernel choices and inference caches, shared by the layers
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i, self.kernels) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.output_dim, bias=False)  # (C, vocab) or (C, 1) for a scalar head
        # Rotary tables kept out of the state dict and out of .to(dtype) (which would drop the imaginary part);
        # built lazily per device: complex for eager code, the same numbers as real (cos, sin) pairs for compiled.
        self._rotary: dict[bool, torch.Tensor] = {}

    def freqs_cis(self, device, real: bool = False) -> torch.Tensor:
        """(max_seq_len, D/2) complex, or (max_seq_len, D/2, 2) real (cos, sin)."""
        table = self._rotary.get(real)
        if table is None or table.device != torch.device(device):
            with torch.inference_mode(False):  # a normal tensor even when made in generate(): training reuses it
                table = precompute_freqs_cis(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device)
                self._rotary = {False: table, True: torch.view_as_real(table).clone()}
        return self._rotary[real]

    @contextlib.contextmanager
    def fresh_fused_weights(self):
        """Refresh every cached fused weight now (eagerly) and let compiled no-grad code inside the
        block read them; no weight may change until it ends (generate's compiled decode steps)."""
        for layer in self.layers:
            layer.attention.fused_qkv()
            layer.feed_forward.fused_w13()
        with self.kernels.fresh_window():
            yield

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> "Transformer":
        """Normal(0, std) weights, with residual output projections scaled by 1/sqrt(2 n_layers) (GPT-2 style)."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                scale = (2 * self.args.n_layers) ** -0.5 if name.endswith(("wo.weight", "w2.weight")) else 1.0
                nn.init.normal_(p, std=std * scale, generator=generator)
        return self

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                      start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """Final-normed hidden states (B, T, C) for tokens (B, T).

        positions (B, T): rotary position of each token (default start_pos + arange(T)); never beyond start_pos + T.
        attn_mask (B, 1, T, S) bool, True = may attend; None = causal. With a cache, keys are [0, start_pos + T).
        start_pos a (1,) tensor: one decoding step over the whole cache (see KVCache.update); then positions and an
        attn_mask over all cache slots are required, and the caller checks the context length.
        """
        B, T = tokens.shape
        if isinstance(start_pos, int) and start_pos + T > self.args.max_seq_len:
            raise ContextLengthError(
                f"sequence of {start_pos + T} tokens exceeds the model's context length {self.args.max_seq_len}")
        table = self.freqs_cis(tokens.device, real=torch.compiler.is_compiling())
        if positions is None:
            freqs_cis = table[start_pos:start_pos + T][None, :, None]  # (1, T, 1, D/2[, 2])
        else:
            freqs_cis = table[positions].unsqueeze(2)  # (B, T, 1, D/2[, 2])
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs_cis, attn_mask, cache, start_pos)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                start_pos: int | torch.Tensor = 0, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, T, vocab) in fp32; (B, T, 1) values for a scalar head.

        With targets (B, T) (model.loss.IGNORE_INDEX where no loss), the mean cross-entropy instead, computed
        without materialising the logits.
        """
        h = self.hidden_states(tokens, positions, attn_mask, cache, start_pos)
        if targets is not None:
            return linear_cross_entropy(h, self.output.weight, targets)
        return self.kernels.linear(h, self.output.weight).float()


def padding_attention_mask(key_valid: torch.Tensor, query_len: int) -> torch.Tensor:
    """Causal mask over padded rows: key_valid (B, S) bool -> (B, 1, T, S) for the last T=query_len positions.

    A query on a padding position may attend itself only, so no softmax row is empty (which would give NaN).
    """
    B, S = key_valid.shape
    q_pos = torch.arange(S - query_len, S, device=key_valid.device).view(-1, 1)  # (T, 1)
    k_pos = torch.arange(S, device=key_valid.device).view(1, -1)  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    mask = causal & key_valid[:, None, :]  # (B, T, S)
    mask |= (k_pos == q_pos) & ~key_valid[:, S - query_len:, None]
    return mask.unsqueeze(1)


def positions_from_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """Rotary positions for left-padded rows: each row's first real token is position 0."""
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)


def count_parameters(args: ModelArgs) -> int:
    """Exact parameter count, built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = Transformer(args)
    return sum(p.numel() for p in model.parameters())
