"""Cross-entropy fused with the output projection, computed in row chunks.

A (B*T, vocab) logits tensor never exists: each chunk's logits, log-sum-exp and gradient are made and used while
they are in cache, and the gradients w.r.t. the hidden states and the head weight are formed in the forward pass
(the loss is a mean, so backward only rescales them). On CPU this removes the largest memory traffic of a training
step; on GPU it saves the logits' memory (the approach of Liger-Kernel's fused linear cross-entropy).
"""

from __future__ import annotations

import torch

from model.matmul import mm_nt, mm_tn

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, compute_dtype):
        # hidden (N, C), weight (V, C), targets (N,) with IGNORE_INDEX on positions without a loss.
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, keep = hidden[rows].to(compute_dtype), valid[rows]
            tgt = targets[rows].clamp(min=0)
            logits = mm_nt(h, w).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, tgt[:, None]).squeeze(1)
            total += ((lse - target_logit) * keep).sum()
            if need_hidden or need_weight:
                # d(sum of losses)/d logits = softmax - onehot(target), zero on ignored rows; reuse the buffer.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(len(tgt), device=tgt.device), tgt] -= 1.0
                grad_logits *= keep[:, None]
                grad_logits = grad_logits.to(compute_dtype)
                if need_hidden:
                    grad_hidden[rows] = mm_nt(grad_logits, w.t())
                if need_weight:
                    grad_weight += mm_tn(grad_logits, h).float()
        ctx.save_for_backward(grad_hidden / n_valid if need_hidden else None,
                              (grad_weight / n_valid).to(weight.dtype) if need_weight else None)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss if grad_hidden is not None else None,
                grad_weight * grad_loss if grad_weight is not None else None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = 512) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` over positions whose target != IGNORE_INDEX.

    hidden (..., C), weight (V, C), targets (...). Matmuls run in the autocast dtype when autocast is on; the
    softmax and the loss in fp32.
    """
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                         chunk_rows, compute_dtype)
