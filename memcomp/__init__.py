"""memcomp: soft context compression for long-context LLMs, on fused Triton kernels.

Top-level names are imported lazily so that ``import memcomp.kernels`` (which never imports
transformers) stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CompressorConfig": "memcomp.config",
    "MemoryCompressor": "memcomp.compressor",
    "Memory": "memcomp.memory",
    "MemoryMismatchError": "memcomp.memory",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memcomp' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
