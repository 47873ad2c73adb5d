"""NVTX ranges for ``nsys profile``: encode, pooling, decoder prefill, generation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range when CUDA is present (visible in nsys as ``memcomp/<name>``); free otherwise."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.nvtx.range_push(f"memcomp/{name}")
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
