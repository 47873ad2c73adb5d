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


@contextlib.contextmanager
def nvtx_first_forward(module: torch.nn.Module, name: str) -> Iterator[None]:
    """Range around ``module``'s first forward inside the block: in HF ``generate`` that call is the
    prefill, so nsys shows prefill apart from the decode steps."""
    if not torch.cuda.is_available():
        yield
        return
    state = {"open": False, "done": False}

    def pre(_module, _args):
        if not state["done"]:
            torch.cuda.nvtx.range_push(f"memcomp/{name}")
            state["open"] = True

    def post(_module, _args, _out):
        if state["open"]:
            torch.cuda.nvtx.range_pop()
            state.update(open=False, done=True)

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if state["open"]:
            torch.cuda.nvtx.range_pop()
