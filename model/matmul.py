"""fp32 matrix products on CPU through oneDNN instead of the BLAS (MKL) that torch calls for them: the low-level ops
that model.kernels chooses between.

MKL's sgemm takes a slow path on AMD CPUs; oneDNN does not, for the training step's large products and, with the
weight prepacked into its blocked layout, for decoding's few-row ones (the README has the measurements). Everywhere
else (GPU, bf16, autocast) the callers use torch's own ops. No module-level mutable state: a weight's packed copy
lives on the weight itself (see prepacked_linear).
"""

from __future__ import annotations

import torch

_ONEDNN = torch.backends.mkldnn.is_available()  # a constant of the build


def onednn_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both fp32 on CPU, autocast off (autocast's bf16 matmuls already run in oneDNN), and not empty."""
    return (_ONEDNN and a.device.type == "cpu" and a.dtype == torch.float32 and b.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and a.numel() > 0 and b.numel() > 0)


@torch.library.custom_op("llama2::onednn_mm_nt", mutates_args=())
def _mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # oneDNN reads transposed (strided) operands as they are: no copies for the backward's a.t() and b.t(). A custom
    # op: inductor's own lowering of this oneDNN call assumes a frozen (constant) weight.
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


@_mm_nt.register_fake
def _(a, b):
    return a.new_empty(*a.shape[:-1], b.shape[0])


def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (..., K) @ b (N, K).T, no autograd."""
    return _mm_nt(a, b) if onednn_applies(a, b) else a @ b.T


def mm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, N).T @ b (M, K) -> (N, K), no autograd (weight gradients). oneDNN copies its first operand when that
    is transposed, so the narrower one goes first: much faster than the other order when N and K differ a lot (the
    output head's vocab x dim), and than MKL."""
    if not onednn_applies(a, b):
        return a.T @ b
    if a.shape[1] >= b.shape[1]:
        return _mm_nt(b.t(), a.t()).t()
    return _mm_nt(a.t(), b.t())


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _mm_nt(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = _mm_nt(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = mm_tn(grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias, forward and backward through oneDNN (the caller checks onednn_applies)."""
    return _Linear.apply(x, weight)


class _Packing:
    """A weight's copy in oneDNN's blocked layout, with the version counter it was packed at. Kept as an attribute
    of the weight, so it lives and dies with it; never copied or pickled with it (deepcopy, Ray): a copy repacks."""

    __slots__ = ("version", "packed")

    def __init__(self, version: int = -1, packed: torch.Tensor | None = None):
        self.version, self.packed = version, packed

    def __reduce__(self):
        return (_Packing, ())


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) in oneDNN's blocked layout, packed on first use and again whenever it changes in place (its
    version counter moves: optimizer steps, load_state_dict). Two threads packing at once each get a correct
    packing of the same version and the last one stays: no lock needed."""
    packing = getattr(weight, "_onednn_packing", None)
    if packing is None or packing.version != weight._version:
        packing = _Packing(weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16))
        weight._onednn_packing = packing
    return packing.packed


@torch.library.custom_op("llama2::prepacked_linear", mutates_args=())
def prepacked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for inference through the weight's packed copy (packed_weight). A custom op so compiled graphs
    can call it (they cannot take oneDNN's opaque packed tensors as inputs). The packed copy lives as long as the
    weight: CPU inference holds each weight twice (fine for the small models this runs on CPU; large ones run on
    GPUs, which never take this)."""
    if weight.is_inference():  # no version counter to tell a change by
        return _mm_nt(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), None, "none", [], "")


@prepacked_linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
