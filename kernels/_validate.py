"""Input checks shared by the packed-segment ops."""

from __future__ import annotations

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """Validate the values of ``cu_seqlens`` (one host sync if it lives on a GPU)."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu.numel() < 2:
        raise ValueError("cu_seqlens must have at least 2 entries (one segment)")
    if int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens must run from 0 to T={total}, got {int(cu[0])} .. {int(cu[-1])}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths < 0).any()):
        bad = int((lengths < 0).nonzero()[0])
        raise ValueError(f"cu_seqlens must be non-decreasing; it decreases after entry {bad}")
    if bool((lengths == 0).any()):
        bad = int((lengths == 0).nonzero()[0])
        raise ValueError(f"segment {bad} of cu_seqlens is empty (cu_seqlens[{bad}] == cu_seqlens[{bad + 1}]); "
                         "every segment needs at least one row")
    if total >= 2**31:
        raise ValueError(f"T={total} rows does not fit int32 cu_seqlens")
