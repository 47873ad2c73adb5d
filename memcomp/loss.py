"""Target-only linear cross-entropy: per-token losses of the LM head on the rows that have a target, without
ever materialising [T, vocab] logits.

    losses = linear_cross_entropy(hidden_rows [M, d], lm_head_weight [V, d], targets [M])   # [M] fp32

The caller gathers target rows first (a CPT row is ~25 % targets; the loss then costs a quarter of the full
LM head). ``impl``: "auto" (liger-kernel's fused linear cross-entropy on CUDA when installed, else ours),
"liger", or "chunked" (ours, PyTorch: logits for ``chunk_rows`` rows at a time in fp32, recomputed in the
backward, so peak memory is one chunk of logits).
"""

from __future__ import annotations

from typing import Optional

import torch


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        losses = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        for s in range(0, hidden.shape[0], chunk_rows):
            logits = hidden[s:s + chunk_rows].float() @ weight.float().t()
            if bias is not None:
                logits += bias.float()
            tgt = targets[s:s + chunk_rows]
            losses[s:s + chunk_rows] = torch.logsumexp(logits, -1) - logits.gather(1, tgt[:, None])[:, 0]
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_rows = chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        db = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_b else None
        wf = weight.float()
        for s in range(0, hidden.shape[0], ctx.chunk_rows):
            h = hidden[s:s + ctx.chunk_rows].float()
            logits = h @ wf.t()
            if bias is not None:
                logits += bias.float()
            g = torch.softmax(logits, -1)
            g.scatter_add_(1, targets[s:s + ctx.chunk_rows, None], -torch.ones_like(g[:, :1]))
            g *= grad_losses[s:s + ctx.chunk_rows, None].float()
            if need_h:
                dh[s:s + ctx.chunk_rows] = (g @ wf).to(hidden.dtype)
            if need_w:
                dw += g.t() @ h
            if need_b:
                db += g.sum(0)
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None)


def _liger(hidden, weight, bias, targets):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    out = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, bias, None, -100, 0.0, 0.0, "none")
    return (out[0] if isinstance(out, tuple) else out).float()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, impl: str = "auto",
                         chunk_rows: int = 4096) -> torch.Tensor:
    """Per-row cross-entropy of ``hidden @ weight^T (+ bias)`` against ``targets``; [M] fp32."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden [M, d] and weight [V, d], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets must be [M={hidden.shape[0]}], got {tuple(targets.shape)}")
    if impl not in ("auto", "liger", "chunked"):
        raise ValueError(f"linear_cross_entropy: impl must be auto, liger or chunked, got {impl!r}")
    if impl == "auto":
        from memcomp.kernels.backend import current_backend

        impl = "chunked"
        if hidden.is_cuda and current_backend() != "reference":
            try:
                import liger_kernel  # noqa: F401

                impl = "liger"
            except ImportError:
                pass
    if hidden.shape[0] == 0:
        return hidden.new_zeros((0,), dtype=torch.float32)
    if impl == "liger":
        return _liger(hidden, weight, bias, targets)
    return _ChunkedLinearCE.apply(hidden, weight, bias, targets.long(), chunk_rows)
