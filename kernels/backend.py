"""One dispatcher that picks, per call, between the Triton kernels and their eager references.

Backends:
  ``auto``      (default) Triton on CUDA tensors, the eager PyTorch reference otherwise;
  ``triton``    always the Triton kernels; CPU tensors need ``TRITON_INTERPRET=1`` set before triton is
                imported (the interpreter then runs them on the CPU, slowly: tests only; bf16 kernels that
                multiply tiles run on fp32 copies there, see ``interpreter_bf16``);
  ``reference`` always the eager PyTorch reference.

Chosen by the environment variable ``MEMCOMP_BACKEND`` or, in code, ``with use_backend("reference"):``
(the context manager wins over the variable and nests).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("memcomp_backend", default=None)


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a memcomp backend; choose one of {', '.join(BACKENDS)}")
    return name


# A compiled graph bakes in the backend chosen while it was traced (these probes are constants to
# torch.compile, which cannot trace ContextVar or os.environ lookups).
@torch.compiler.assume_constant_result
def current_backend() -> str:
    """The backend requested now: the innermost ``use_backend`` or else ``$MEMCOMP_BACKEND`` (auto)."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get("MEMCOMP_BACKEND", "auto"), "MEMCOMP_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (thread- and task-local)."""
    token = _override.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


@torch.compiler.assume_constant_result
def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_bf16(*tensors: torch.Tensor | None) -> bool:
    """Whether a Triton launch on these tensors would run in Triton's interpreter with bfloat16 data. The
    interpreter computes bf16 ``tl.dot`` wrongly (errors of 1e8 and more, no error raised), so launchers whose
    kernels multiply bf16 tiles run them on fp32 copies and round the result to bf16 instead: correct values,
    at interpreter speed. Kernels that upcast right after loading (segment_mean_proj, nf4_dequantize) are right
    in bf16 as they are. Never true for CUDA tensors."""
    return interpreter_enabled() and any(
        t is not None and not t.is_cuda and t.dtype == torch.bfloat16 for t in tensors)


@functools.cache
def _warn_once(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def resolve(op: str, *tensors: torch.Tensor | None) -> str:
    """Return ``"triton"`` or ``"reference"`` for one call of ``op`` on these tensors."""
    name = current_backend()
    if name == "reference":
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if name == "auto":
        if not on_cuda:
            return "reference"
        if not triton_available():
            _warn_once(f"memcomp: triton is not installed, {op} runs its eager reference on CUDA "
                       "(pip install triton, or set MEMCOMP_BACKEND=reference to silence this)")
            return "reference"
        return "triton"
    if not triton_available():
        raise RuntimeError(f"MEMCOMP_BACKEND=triton but triton is not installed (needed by {op}); "
                           "pip install triton")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"MEMCOMP_BACKEND=triton with CPU tensors for {op}: Triton kernels need CUDA tensors, or "
            "TRITON_INTERPRET=1 set before triton is imported to run them in the interpreter")
    return "triton"
