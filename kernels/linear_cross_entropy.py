r"""linear_cross_entropy: per-token cross-entropy of an LM head on the rows that have a target, without ever
materialising [M, vocab] logits.

    losses = linear_cross_entropy(hidden [M, d], weight [V, d], targets [M], bias [V] = None)   # [M] fp32

Math, for row i with target t_i and an upstream gradient g_i of any sign (1 / n for a mean, an advantage for a
policy-gradient loss, 0 for a masked token):

    z_i      = W h_i + b                                   (fp32 logits, one chunk of rows at a time)
    loss_i   = logsumexp(z_i) - z_i[t_i]
    dz_i     = g_i * (softmax(z_i) - onehot(t_i))          ([V] per row; never stored for all rows)
    dh_i     = dz_i W,    dW = sum_i dz_i^T h_i,    db = sum_i dz_i

g_i has to enter each row's dz_i *before* the sums over rows that make dW and db: once summed, only
sum_i (softmax_i - onehot_i)^T h_i is left, and no rescaling recovers sum_i g_i (softmax_i - onehot_i)^T h_i.
liger-kernel before 0.8.2 computed dW and db in the forward, assuming g = 1, and scaled them in the backward by
g[0] alone (linkedin/Liger-Kernel#1298): per-token weights came out wrong with no error. Both implementations here
take g_i per row.

The caller gathers the target rows first (a CPT row is ~25 % targets, so the LM head costs a quarter of the full
one). What is fused, and why: the logits exist one chunk of rows at a time, in the forward (losses) and again in
the backward (recomputed from h and W, then dh and dW), so peak memory is one chunk of logits instead of M x V
(8,192 x 152,064 fp32 logits are 5 GB). Cost: four M x V x d GEMMs (forward logits; backward recompute, dh, dW).
Not yet timed on a GPU (bench/bench_linear_cross_entropy.py compares it with liger over all rows and eager).

Implementations, one chosen per call (``impl``, or by default the one backend resolver of
``memcomp.kernels.backend``: its "triton" is liger, its "reference" is chunked):

  ``liger``    liger-kernel's fused linear cross-entropy (Triton): logits in the input dtype, softmax and its
               gradient by liger's cross-entropy kernel in fp32, dW / db accumulated in fp32 (bf16 sums over
               V / d chunks would lose the gradient's low bits; the cost is a V x d fp32 buffer during the
               backward, 2.2 GB at Qwen2.5-7B's head). CUDA tensors, or
               CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported; tests
               only). liger counts non-ignored targets with ``.item()``: one host sync per call, so this path
               cannot be captured in a CUDA graph.
  ``chunked``  the eager PyTorch reference and CPU fallback: ``chunk_rows`` rows of fp32 logits at a time,
               recomputed in the backward. No host sync.

Both run inside the custom op ``memcomp::linear_cross_entropy`` (fake implementation, autograd through
``memcomp::linear_cross_entropy_backward``), so ``torch.compile`` traces one opaque node and keeps the
implementation chosen when it traced. liger's ``LigerFusedLinearCrossEntropyFunction`` cannot run inside an op
body (autograd records nothing below the op), so the op calls liger's chunk loop,
``fused_linear_cross_entropy_forward``, by keyword: losses only in the forward (``compute_gradients=False``),
then, in the backward, the gradients with the per-token ``token_grad_output`` folded in before the sums -- the
two calls liger's own autograd makes for ``reduction="none"`` since 0.8.2, the pinned floor.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import warnings
from typing import Optional

import torch
from memcomp.kernels.backend import current_backend, interpreter_enabled, resolve

__all__ = [
    "linear_cross_entropy",
    "linear_cross_entropy_chunked_forward",
    "linear_cross_entropy_chunked_backward",
    "linear_cross_entropy_liger_forward",
    "linear_cross_entropy_liger_backward",
    "LIGER_FLOOR",
    "IMPLS",
]

IMPLS = ("auto", "liger", "chunked")

# The first liger-kernel release whose reduction="none" backward applies a per-token upstream gradient to dW and
# db (linkedin/Liger-Kernel#1298, in 0.8.2; 0.8.1 and older scale every token's gradient by grad_output[0]). The
# same release added the keywords the op calls below. pyproject.toml pins the same floor.
LIGER_FLOOR = "0.8.2"
_LIGER_KEYWORDS = ("_input", "weight", "target", "bias", "ignore_index", "reduction", "accum_dtype",
                   "token_grad_output", "compute_gradients", "weight_requires_grad")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# liger-kernel: probed once, imported at first use (importing it takes seconds and pulls in transformers)
# ----------------------------------------------------------------------------------------------------

@functools.cache
def _liger_problem() -> str:
    """Why liger-kernel cannot serve this op ("" when it can), from the installed metadata (no import)."""
    from packaging.version import Version

    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return f"liger-kernel is not installed (pip install 'liger-kernel>={LIGER_FLOOR}')"
    if Version(version) < Version(LIGER_FLOOR):
        return (f"liger-kernel {version} is older than {LIGER_FLOOR}: its reduction='none' backward scales every "
                f"token's gradient by the first token's (linkedin/Liger-Kernel#1298); "
                f"pip install 'liger-kernel>={LIGER_FLOOR}'")
    return ""


@torch.compiler.assume_constant_result
def liger_usable() -> bool:
    """Whether an installed liger-kernel at or above the floor can run the "liger" implementation."""
    return not _liger_problem()


@functools.cache
def _liger_chunk_loop():
    """liger's ``fused_linear_cross_entropy_forward``, after checking it takes every keyword passed to it."""
    if _liger_problem():
        raise ImportError(f"linear_cross_entropy(impl='liger'): {_liger_problem()}")
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

    params = inspect.signature(fused_linear_cross_entropy_forward).parameters
    missing = [k for k in _LIGER_KEYWORDS if k not in params]
    if missing:
        version = importlib.metadata.version("liger-kernel")
        raise ImportError(f"linear_cross_entropy(impl='liger'): liger-kernel {version}'s "
                          f"fused_linear_cross_entropy_forward has no keyword {', '.join(missing)} (memcomp calls it "
                          f"by keyword, checked against {LIGER_FLOOR} and 0.8.5); use impl='chunked' or another "
                          "liger-kernel")
    return fused_linear_cross_entropy_forward


@functools.cache
def _warn_once(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------
# The two implementations (the op below calls them; they take validated inputs, targets int64)
# ----------------------------------------------------------------------------------------------------

def linear_cross_entropy_chunked_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                         targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """Eager PyTorch, ``chunk_rows`` rows of fp32 logits at a time -> losses [M] fp32."""
    losses = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    wf = weight.float()  # once, not per chunk (a no-op for fp32 weights)
    bf = None if bias is None else bias.float()
    for s in range(0, hidden.shape[0], chunk_rows):
        logits = hidden[s:s + chunk_rows].float() @ wf.t()
        if bf is not None:
            logits += bf
        tgt = targets[s:s + chunk_rows, None]
        losses[s:s + chunk_rows] = torch.logsumexp(logits, -1) - logits.gather(1, tgt)[:, 0]
    return losses


def linear_cross_entropy_chunked_backward(grad_losses: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                          bias: Optional[torch.Tensor], targets: torch.Tensor, chunk_rows: int,
                                          need_hidden: bool, need_weight: bool, need_bias: bool):
    """Recompute each chunk's fp32 logits; dz = g * (softmax - onehot) per row, then dh, dW, db (fp32 sums).
    Returns (dh [M, d] | [0, d], dW [V, d] | [0, d], db [V] | [0]) in the inputs' dtypes; empty where not needed."""
    M, d = hidden.shape
    wf = weight.float()
    bf = None if bias is None else bias.float()
    dh = torch.empty_like(hidden) if need_hidden else hidden.new_empty((0, d))
    dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
    db = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_bias else None
    for s in range(0, M, chunk_rows):
        h = hidden[s:s + chunk_rows].float()
        logits = h @ wf.t()
        if bf is not None:
            logits += bf
        dz = torch.softmax(logits, -1)
        dz.scatter_add_(1, targets[s:s + chunk_rows, None], -torch.ones_like(dz[:, :1]))
        dz *= grad_losses[s:s + chunk_rows, None].float()  # per row, before any sum over rows
        if need_hidden:
            dh[s:s + chunk_rows] = (dz @ wf).to(hidden.dtype)
        if need_weight:
            dw += dz.t() @ h
        if need_bias:
            db += dz.sum(0)
    return (dh, dw.to(weight.dtype) if need_weight else weight.new_empty((0, d)),
            db.to(bias.dtype) if need_bias else hidden.new_empty((0,)))


def linear_cross_entropy_liger_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                       targets: torch.Tensor) -> torch.Tensor:
    """liger-kernel's chunk loop, losses only (no gradient buffers) -> losses [M] fp32."""
    if hidden.shape[0] == 0:  # liger sizes its chunks by M and cannot take an empty batch
        return hidden.new_empty((0,), dtype=torch.float32)
    with torch.no_grad():  # liger >= 0.8.3 then writes each chunk's logits into one reused buffer on CUDA
        out = _liger_chunk_loop()(_input=hidden, weight=weight, target=targets, bias=bias, ignore_index=-100,
                                  reduction="none", compute_gradients=False)
    return out[0].float()


def linear_cross_entropy_liger_backward(grad_losses: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                        bias: Optional[torch.Tensor], targets: torch.Tensor, need_hidden: bool,
                                        need_weight: bool, need_bias: bool):
    """liger-kernel's chunk loop with the per-token gradient folded into each row's dz before the sums
    (``token_grad_output``), dW and db accumulated in fp32. Same returns as the chunked backward."""
    M, d = hidden.shape
    if M == 0:
        dh = hidden.new_empty((0, d))
        dw = torch.zeros_like(weight) if need_weight else weight.new_empty((0, d))
        db = torch.zeros_like(bias) if need_bias else hidden.new_empty((0,))
        return dh, dw, db
    with torch.no_grad():
        out = _liger_chunk_loop()(_input=hidden, weight=weight, target=targets, bias=bias, ignore_index=-100,
                                  reduction="none", accum_dtype=torch.float32,
                                  token_grad_output=grad_losses.float().contiguous(),
                                  compute_gradients=True, weight_requires_grad=need_weight)
    dh, dw, db = out[4], out[5], out[6]
    return (dh.to(hidden.dtype) if need_hidden else hidden.new_empty((0, d)),
            dw.to(weight.dtype) if need_weight else weight.new_empty((0, d)),
            db.to(bias.dtype) if need_bias else hidden.new_empty((0,)))


# ----------------------------------------------------------------------------------------------------
# torch.library registration: memcomp::linear_cross_entropy (+ its backward), fake impls, autograd
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("memcomp::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             targets: torch.Tensor, impl: str, chunk_rows: int) -> torch.Tensor:
    if impl == "liger":
        return linear_cross_entropy_liger_forward(hidden, weight, bias, targets)
    return linear_cross_entropy_chunked_forward(hidden, weight, bias, targets, chunk_rows)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, targets, impl, chunk_rows):
    return hidden.new_empty((hidden.shape[0],), dtype=torch.float32)


@torch.library.custom_op("memcomp::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(grad_losses: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                      bias: Optional[torch.Tensor], targets: torch.Tensor, impl: str,
                                      chunk_rows: int, need_hidden: bool, need_weight: bool,
                                      need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if impl == "liger":
        return linear_cross_entropy_liger_backward(grad_losses, hidden, weight, bias, targets, need_hidden,
                                                   need_weight, need_bias)
    return linear_cross_entropy_chunked_backward(grad_losses, hidden, weight, bias, targets, chunk_rows,
                                                 need_hidden, need_weight, need_bias)


@_linear_cross_entropy_backward_op.register_fake
def _(grad_losses, hidden, weight, bias, targets, impl, chunk_rows, need_hidden, need_weight, need_bias):
    d = hidden.shape[1]
    return (hidden.new_empty(hidden.shape if need_hidden else (0, d)),
            weight.new_empty(weight.shape if need_weight else (0, d)),
            bias.new_empty(bias.shape) if need_bias else hidden.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, impl, chunk_rows = inputs
    ctx.impl, ctx.chunk_rows = impl, chunk_rows
    ctx.save_for_backward(hidden, weight, bias, targets)


def _backward(ctx, grad_losses):
    hidden, weight, bias, targets = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    dh, dw, db = _linear_cross_entropy_backward_op(grad_losses, hidden, weight, bias, targets, ctx.impl,
                                                   ctx.chunk_rows, need_hidden, need_weight, need_bias)
    return (dh if need_hidden else None, dw if need_weight else None, db if need_bias else None, None, None, None)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

def _check_tensors(hidden, weight, targets, bias, chunk_rows) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden must be [M, d] and weight [V, d], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("linear_cross_entropy: weight has no rows (V = 0)")
    if tuple(targets.shape) != (hidden.shape[0],):
        raise ValueError(f"linear_cross_entropy: targets must be [M={hidden.shape[0]}], got {tuple(targets.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"linear_cross_entropy: hidden must be fp32/fp16/bf16, got {hidden.dtype}")
    # One dtype for all: liger multiplies hidden by weight as given, and both implementations should accept
    # the same inputs (the resolver picks one by device).
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"linear_cross_entropy: {name} is {t.dtype} but hidden is {hidden.dtype}; cast one")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"linear_cross_entropy: targets must be int64 (or int32) class ids, got {targets.dtype}")
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"linear_cross_entropy: {name} is on {t.device} but hidden is on {hidden.device}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be a positive int, got {chunk_rows!r}")


def _check_targets(targets: torch.Tensor, vocab: int) -> None:
    """Every target in [0, V) (one host sync on a GPU). Out of range, the chunked path would fail in a gather and
    liger would count -100 as ignored (loss 0): the two must not differ silently."""
    bad = (targets < 0) | (targets >= vocab)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: targets must be class ids in [0, V={vocab}); row {row} has "
                         f"{int(targets[row])} (gather the target rows first: there is no ignore_index)")


def _pick(impl: str, tensors: tuple) -> str:
    if impl == "auto":
        if resolve("linear_cross_entropy", *tensors) == "reference":
            return "chunked"
        if current_backend() == "auto" and not liger_usable():
            # The resolver's rule for a missing triton, applied to liger: say so once, run the reference.
            _warn_once(f"memcomp: {_liger_problem()}; linear_cross_entropy runs its chunked PyTorch reference "
                       "(set MEMCOMP_BACKEND=reference to silence this)")
            return "chunked"
        impl = "liger"
    if impl == "liger":
        if not liger_usable():
            raise ImportError(f"linear_cross_entropy(impl='liger'): {_liger_problem()}")
        if not all(t.is_cuda for t in tensors if t is not None) and not interpreter_enabled():
            raise RuntimeError("linear_cross_entropy: liger-kernel's Triton kernels need CUDA tensors, or "
                               "TRITON_INTERPRET=1 set before triton is imported to run them on the CPU in the "
                               "interpreter; use impl='chunked' (or MEMCOMP_BACKEND=reference) for CPU tensors")
    return impl


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, impl: str = "auto", chunk_rows: int = 4096,
                         check_inputs: bool = True) -> torch.Tensor:
    """Per-row cross-entropy of ``hidden @ weight^T (+ bias)`` against ``targets``, without [M, V] logits.

    Args:
        hidden: [M, d] fp32 / fp16 / bf16, the rows that have a target (gathered by the caller).
        weight: [V, d], the LM head, same dtype and device as ``hidden``.
        targets: [M] int64 (or int32) class ids in [0, V); there is no ignore_index.
        bias: optional [V], same dtype.
        impl: "auto" (the backend resolver: liger on CUDA tensors, chunked otherwise; ``use_backend`` /
            ``MEMCOMP_BACKEND`` force one), "liger" or "chunked" (see the module docstring).
        chunk_rows: rows of fp32 logits per chunk in the chunked implementation (peak memory chunk_rows x V x 4
            bytes).
        check_inputs: check that every target is in [0, V) (one host sync on a GPU; skipped under torch.compile).

    Returns:
        losses [M] fp32, differentiable in hidden, weight and bias; the backward takes any per-row upstream
        gradient (weights, advantages, zeros) and applies it per row.

    Raises:
        ValueError / TypeError on bad shapes, dtypes, devices, targets or ``chunk_rows``; ImportError when liger is
        requested but missing or older than ``LIGER_FLOOR``; RuntimeError when liger is requested for CPU tensors
        outside Triton's interpreter (and ``resolve``'s errors for a forced "triton" backend).
    """
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy: impl must be one of {IMPLS}, got {impl!r}")
    _check_tensors(hidden, weight, targets, bias, chunk_rows)
    if check_inputs and hidden.shape[0] and not torch.compiler.is_compiling():  # a value check cannot be traced
        _check_targets(targets, weight.shape[0])
    impl = _pick(impl, (hidden, weight, bias, targets))
    return _linear_cross_entropy_op(hidden, weight, bias, targets.long(), impl, chunk_rows)
