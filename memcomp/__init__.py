"""memcomp: soft context compression for long-context LLMs, on fused Triton kernels.

Top-level names are imported lazily so that ``import memcomp.kernels`` (which never imports
transformers) stays light.
"""

from __future__ import annotations

import importlib
import pkgutil

__version__ = "0.1.0"

# memcomp.kernels and memcomp.trainers live in the checkout's kernels/ and trainers/ folders, not inside memcomp/.
# Python started in the checkout imports this package from ./memcomp (the working directory comes first on
# sys.path), where they are missing; the install (scripts/setup.sh: a tree of links on sys.path) has them.
# extend_path adds every other `memcomp` folder on sys.path to this package's search path, so they resolve there.
__path__ = pkgutil.extend_path(__path__, __name__)

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
