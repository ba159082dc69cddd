"""Which kernel each product and attention of the network takes, on CPU and GPU (model.llama holds the network only).

A Transformer owns one `Kernels` object and hands it to its layers; it holds the inference-only state: the fused
QKV/W13 weights cache (filled under a lock) and the "fused weights are fresh" window count. Nothing here is
module-level mutable state, so a server may call generate() on one model from several threads.
Shapes: B batch, T query length, S key length, H query heads, K kv heads, G = H/K, D head dim.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from model.matmul import onednn_applies, onednn_linear, prepacked_linear

DECODE_MATVEC_ROWS = 4  # compiled inference with at most this many rows: a product and a sum (see Kernels.linear)

# PyTorch's CPU flash attention runs bf16 on AMX tiles where the CPU has them; without them its bf16 kernel is slower
# than its fp32 one, so there attention runs in fp32 (as precise as Meta's fp32 softmax, or more). A constant.
_CPU_FP32_ATTENTION = not getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()  # a private torch API


# bf16 autocast pays only where bf16 products run natively (AVX512-BF16 or AMX on CPU): on a CPU with AVX2 alone
# oneDNN has no bf16 kernel and a bf16 matmul is tens of times slower than fp32. A constant of the machine.
_CPU_BF16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def bf16_autocast(device_type: str, requested: bool = True):
    """torch.autocast to bf16 when requested and the device computes bf16 natively; else off (fp32)."""
    native = torch.cuda.is_bf16_supported() if device_type == "cuda" else device_type == "cpu" and _CPU_BF16
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=requested and native)


def compile_enabled(requested: bool | None) -> bool:
    """torch.compile only where the caller asks for it (compiling is slow in each new process) and
    $LLAMA2_COMPILE is not 0 (a switch for machines without a working C++ toolchain, or to rule compiling out)."""
    return bool(requested) and os.environ.get("LLAMA2_COMPILE", "1") != "0"


class Kernels:
    """The kernel state of one Transformer, shared by its layers.

    The fresh window is a count of open windows, changed under the lock: a saved-and-restored flag left the
    model marked fresh for good when two threads' windows overlapped. Not thread-local: dynamo does not guard on a
    threading.local's value (it bakes the first one in), but it does guard on a plain int attribute. So while any
    thread holds a window, every thread's compiled calls on this model read the cached weights: correct under the
    window's contract that no weight of the model changes while it is open.
    """

    def __init__(self):
        self._lock = threading.Lock()  # around cache fills and window counts
        self._windows = 0  # open fresh windows
        # Weight caches (fused QKV/W13, oneDNN packings) tell a changed weight by its storage and version counter.
        # FSDP2 refills its gathered weights in place with the version counter preserved: a sharded model turns
        # them off (components.train.parallel).
        self.cache_weights = True

    def __reduce__(self):  # deepcopy / pickle of a model: a new, empty state (locks do not copy)
        return (Kernels, ())

    @property
    def fresh(self) -> bool:
        return self._windows > 0

    @contextlib.contextmanager
    def fresh_window(self):
        """Let compiled no-grad code on this model read the cached fused weights until the block ends (the caller
        has just refreshed them: Transformer.fresh_fused_weights); no weight may change meanwhile."""
        with self._lock:
            self._windows += 1
        try:
            yield
        finally:
            with self._lock:
                self._windows -= 1

    def fused_weight(self, owner: nn.Module, name: str, linears: tuple[nn.Linear, ...]) -> torch.Tensor:
        """The linears' weights concatenated on the output dim, cached on `owner` until any of them changes.

        Inference only (no autograd): one matmul instead of several matters when decoding is overhead-bound. The key
        holds each weight's storage and version counter, so optimizer steps and reloads invalidate it.
        """
        cached = owner.__dict__.get(name)
        if not self.cache_weights:
            return torch.cat([lin.weight for lin in linears])
        if torch.compiler.is_compiling():
            # A compiled graph cannot check version counters: it may take the cached weight only inside a
            # fresh_fused_weights() window; anywhere else it concatenates (correct, a copy per call).
            if self.fresh and cached is not None:
                return cached[1]
            return torch.cat([lin.weight for lin in linears])
        key = tuple((lin.weight.data_ptr(), lin.weight._version) for lin in linears)
        if cached is None or cached[0] != key:
            with self._lock:  # one thread concatenates; the others then find its result
                cached = owner.__dict__.get(name)
                if cached is None or cached[0] != key:
                    with torch.inference_mode(False):  # a normal tensor even under inference_mode: it gets packed
                        cached = (key, torch.cat([lin.weight.detach() for lin in linears]))
                    owner.__dict__[name] = cached
        return cached[1]

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """F.linear(x, weight), no bias; in fp32 on CPU through oneDNN (model.matmul: MKL's sgemm takes a slow path on
        some AMD CPUs, oneDNN does not):
        - training: forward and backward products in oneDNN (onednn_linear);
        - inference: the weight prepacked into oneDNN's blocked layout once, until it changes (prepacked_linear);
        - compiled inference with at most DECODE_MATVEC_ROWS rows (decoding a few sequences): a product and a sum,
          which inductor makes one vectorised pass over the weight, the bound of a matrix-vector product (faster
          there than the prepacked product, and than MKL).
        """
        if not onednn_applies(x, weight):
            return F.linear(x, weight)
        if torch.is_grad_enabled() or not self.cache_weights:
            return onednn_linear(x, weight)
        if torch.compiler.is_compiling():
            if x.shape[:-1].numel() <= DECODE_MATVEC_ROWS:
                return (x.unsqueeze(-2) * weight).sum(-1)  # (..., 1, C) * (N, C) -> (..., N)
            if not self.fresh:
                # The weight may be a concatenation in the graph, whose buffer inductor reuses for other tensors
                # without moving a version counter: nothing could tell its cached packing stale.
                return F.linear(x, weight)
        return prepacked_linear(x, weight)


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """SDPA for q (B, K, G, D) against k, v (B, K, S, D), spelled as products and sums (in fp32) that inductor
    fuses into a few loops: under torch.compile, cheaper than a call to the SDPA kernel for one query per row."""
    scores = (q.float().unsqueeze(3) * k.float().unsqueeze(2)).sum(-1) * q.shape[-1] ** -0.5  # (B, K, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).unsqueeze(-1) * v.float().unsqueeze(2)).sum(3).type_as(q)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA of q (B, H, T, D) over k, v (B, K, S, D); mask None = causal (training and unpadded prefill take the
    is_causal fast path)."""
    gqa = k.shape[1] != q.shape[1]
    if q.device.type == "cpu" and q.dtype != torch.float32 and _CPU_FP32_ATTENTION:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=gqa)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              single_query: bool) -> torch.Tensor:
    """Attention of q (B, T, H, D) over k, v (B, K, S, D) -> (B, T, H, D); mask (B, 1, T, S) bool or None = causal.

    single_query (one decoding query per row, T=1, keys from a cache): each kv head's group of query heads is folded
    into the query length, (B, 1, H, D) -> (B, K, G, D), so SDPA needs neither a causal mask nor a GQA expansion;
    under torch.compile as products and sums (single_query_attention).
    """
    B, T, H, D = q.shape
    if single_query:
        q = q.view(B, k.shape[1], H // k.shape[1], D)
        if torch.compiler.is_compiling():
            y = single_query_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.reshape(B, 1, H, D)
    return block_attention(q.transpose(1, 2), k, v, mask).transpose(1, 2)
