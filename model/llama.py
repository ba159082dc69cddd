"""The Llama 2 network (Touvron et al. 2023), in one file, with Meta's weight names.

Decoder-only transformer: pre-norm RMSNorm, SwiGLU feed-forward, rotary embeddings, grouped-query attention, no
biases, untied output head. Attention goes through `F.scaled_dot_product_attention` (flash kernels on GPU).
Shapes in comments: B batch, T query length, S key length, H query heads, K kv heads, D head dim, C model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelArgs
from model.loss import linear_cross_entropy


class ContextLengthError(ValueError):
    """An input longer than the model's context length (max_seq_len)."""


def precompute_freqs_cis(head_dim: int, end: int, theta: float, device=None) -> torch.Tensor:
    """Rotary frequencies as unit complex numbers, (end, head_dim/2), computed in fp32 as Meta does."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, T, H, D) by freqs_cis (B or 1, T, 1, D/2): one complex multiply."""
    x_complex = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(x_complex * freqs_cis).flatten(-2).type_as(x)


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
    """Preallocated keys and values for every layer: (B, K, max_len, D) each, written in place during decoding."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > args.max_seq_len:
            raise ContextLengthError(f"KV cache of {max_len} positions exceeds the context length {args.max_seq_len}")
        shape = (args.n_layers, batch_size, args.kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at positions [start, start+T); return all keys and values up to there."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def fused_inference_weight(owner: nn.Module, name: str, linears: tuple[nn.Linear, ...]) -> torch.Tensor:
    """The linears' weights concatenated on the output dim, cached on `owner` until any of them changes.

    Inference only (no autograd): one matmul instead of several matters when decoding is overhead-bound. The key
    holds each weight's storage and version counter, so optimizer steps and reloads invalidate it.
    """
    key = tuple((lin.weight.data_ptr(), lin.weight._version) for lin in linears)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, torch.cat([lin.weight.detach() for lin in linears]))
        owner.__dict__[name] = cached
    return cached[1]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, freqs_cis, attn_mask=None, cache: KVCache | None = None, start_pos: int = 0):
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        if torch.is_grad_enabled():
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            q, k, v = F.linear(x, fused_inference_weight(self, "_wqkv", (self.wq, self.wk, self.wv))).split(
                (H * D, K * D, K * D), dim=-1)
        q = apply_rotary_emb(q.view(B, T, H, D), freqs_cis)
        k = apply_rotary_emb(k.view(B, T, K, D), freqs_cis)
        k, v = k.transpose(1, 2), v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)  # (B, K, S, D)
        if T == 1 and cache is not None:
            # One decoding query per row: fold each kv head's group of query heads into the query length,
            # (B, 1, H, D) -> (B, K, H/K, D), so SDPA needs neither a causal mask nor a GQA expansion.
            y = F.scaled_dot_product_attention(q.view(B, K, H // K, D), k, v, attn_mask=attn_mask)
        else:
            # Without a mask, a full causal block (training, unpadded prefill) takes the is_causal fast path.
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=attn_mask,
                                               is_causal=attn_mask is None, enable_gqa=K != H)
            y = y.transpose(1, 2)  # (B, T, H, D)
        return self.wo(y.reshape(B, T, H * D))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        if torch.is_grad_enabled():
            gate, up = self.w1(x), self.w3(x)
        else:
            gate, up = F.linear(x, fused_inference_weight(self, "_w13", (self.w1, self.w3))).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs_cis, attn_mask=None, cache=None, start_pos=0):
        h = x + self.attention(self.attention_norm(x), freqs_cis, attn_mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.output_dim, bias=False)  # (C, vocab) or (C, 1) for a scalar head
        # Rotary table kept out of the state dict and out of .to(dtype) (which would drop its imaginary part);
        # built lazily per device.
        self._freqs_cis: torch.Tensor | None = None

    def freqs_cis(self, device) -> torch.Tensor:
        if self._freqs_cis is None or self._freqs_cis.device != torch.device(device):
            self._freqs_cis = precompute_freqs_cis(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta,
                                                   device)
        return self._freqs_cis

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
                      start_pos: int = 0) -> torch.Tensor:
        """Final-normed hidden states (B, T, C) for tokens (B, T).

        positions (B, T): rotary position of each token (default start_pos + arange(T)); never beyond start_pos + T.
        attn_mask (B, 1, T, S) bool, True = may attend; None = causal. With a cache, keys are [0, start_pos + T).
        """
        B, T = tokens.shape
        end = start_pos + T
        if end > self.args.max_seq_len:
            raise ContextLengthError(
                f"sequence of {end} tokens exceeds the model's context length {self.args.max_seq_len}")
        table = self.freqs_cis(tokens.device)
        if positions is None:
            freqs_cis = table[start_pos:end].view(1, T, 1, -1)
        else:
            freqs_cis = table[positions].unsqueeze(2)  # (B, T, 1, D/2)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs_cis, attn_mask, cache, start_pos)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                start_pos: int = 0, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, T, vocab) in fp32; (B, T, 1) values for a scalar head.

        With targets (B, T) (model.loss.IGNORE_INDEX where no loss), the mean cross-entropy instead, computed
        without materialising the logits.
        """
        h = self.hidden_states(tokens, positions, attn_mask, cache, start_pos)
        if targets is not None:
            return linear_cross_entropy(h, self.output.weight, targets)
        return self.output(h).float()


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
