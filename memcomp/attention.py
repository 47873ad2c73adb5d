"""Packed attention inside Hugging Face models, through transformers' own registries (no class patching).

``memcomp_packed`` is registered with ``AttentionInterface`` (attention: ``memcomp.fused.packed_attention``
over the segments given by the ``cu_seq_lens_q`` keyword that transformers forwards to every attention
call) and with ``AttentionMaskInterface`` (no mask is built: no T x T tensor for a packed row). A model
instance uses it only inside ``with packed_attention_mode(model):``; everywhere else it keeps its own
implementation (sdpa, flash-attn, ...), e.g. for generation with padding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from memcomp.fused import packed_attention

ATTN_IMPLEMENTATION = "memcomp_packed"


def _memcomp_packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """query [1, Hq, T, D], key / value [1, Hkv, T, D] -> ([1, T, Hq, D], None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError("memcomp_packed attention needs cu_seq_lens_q= (the packed segments); "
                         "call the model with cu_seq_lens_q / max_length_q, or outside packed_attention_mode")
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row (batch size 1), got batch size {query.shape[0]}")
    if dropout and module.training:
        raise NotImplementedError("memcomp_packed attention has no attention dropout (Qwen2 trains without it)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))           # [T, H, D]
    out = packed_attention(q, k, v, cu, kwargs.get("max_length_q"), causal=is_causal is not False,
                           softmax_scale=scaling, check_inputs=not cu.is_cuda)
    return out[None], None


def _no_mask(*args, **kwargs):
    return None


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _memcomp_packed_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


@contextlib.contextmanager
def packed_attention_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` (an HF model or its base) on packed rows inside the block; restored afterwards."""
    register()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTN_IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = previous
