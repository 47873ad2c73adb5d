r"""nf4_lora_linear: a frozen NF4 base weight plus a trainable LoRA adapter, forward and backward.

    y = x W^T + s * drop(x) A^T B^T + b          x [M, K], W = dequant(NF4) [N, K], A [r, K], B [N, r]

Backward (W frozen): with u = drop(x) A^T and xa = s * u [M, r] (saved by the forward),
    du = s * dy B [M, r],   dB = dy^T xa,   dA = du^T drop(x),   dx = dy W + d(drop(x)) with
    d(drop(x)) = du A,   db = sum_m dy.

Dropout is applied by PyTorch outside the op (its autograd keeps the mask, as in peft), so the op itself is
deterministic; with p = 0 the op sees x once and folds the LoRA terms into the base GEMMs.

What runs where, and why:
* Training shapes (M > SMALL_M): W is dequantized by the Triton kernel into a scratch buffer that every
  layer of the same shape reuses (nothing dequantized is kept between forward and backward: activation
  memory is a plain LoRA layer's), then cuBLAS does the GEMM. On Hopper, dequantize + cuBLAS beats a
  Triton GEMM with dequantization in its main loop once M is in the hundreds (bitsandbytes makes the same
  choice above M ~ 16-64). The LoRA path is folded into that GEMM where it saves bytes:
  forward y = [x | xa] . [W | B]^T (one GEMM of depth K + r; costs a copy of x, chosen when K < 2N,
  otherwise y += xa B^T re-reads y), backward dx = [dy | du] . [W ; A] (chosen when N < 2K). The unfused
  LoRA path costs ~10-15 % of the base GEMM on H100-class GPUs; folding removes most of it.
* Decode shapes (M <= SMALL_M): the GEMM is memory-bound on the weight, so one Triton kernel reads the
  packed NF4 bytes (0.53 B per weight instead of 2), dequantizes each tile in registers inside the main
  loop, and adds xa B^T and the bias in the epilogue.
No GPU has measured these choices yet (bench/bench_nf4_lora_linear.py does, against bitsandbytes + peft
and bf16 F.linear + LoRA); the thresholds are the documented starting points, to be revised with numbers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from memcomp.kernels.backend import interpreter_bf16, resolve
from memcomp.kernels.nf4_dequantize import (
    NESTED_BLOCKSIZE,
    code_table,
    nf4_dequantize_forward,
    nf4_dequantize_reference,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:
    from memcomp.kernels.nf4_dequantize import _nf4_block_absmax

__all__ = ["nf4_lora_linear_raw", "nf4_lora_linear_reference", "SMALL_M"]

# At or below this many rows the fused dequantize-in-the-main-loop kernel runs (decode).
SMALL_M = 16


# ----------------------------------------------------------------------------------------------------
# Triton kernel (decode shapes)
# ----------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _nf4_lora_linear_fwd_kernel(
        # inputs
        x_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, xa_ptr, b_ptr, bias_ptr,
        # output
        y_ptr,
        # sizes
        M, N, K, R,
        # strides
        stride_x_m, stride_xa_m, stride_b_n, stride_y_m,
        # compile-time
        BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        row_base = offs_n.to(tl.int64) * K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_x_m + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            # W tile [BLOCK_N, BLOCK_K] straight from the packed bytes (even element = high nibble).
            e = row_base[:, None] + offs_k[None, :]
            w_mask = n_mask[:, None] & k_mask[None, :]
            byte = tl.load(packed_ptr + (e >> 1), mask=w_mask, other=0).to(tl.int32)
            nib = (byte >> ((1 - (e & 1)) * 4).to(tl.int32)) & 15
            a = _nf4_block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e // BLOCKSIZE, w_mask, NESTED,
                                  NESTED_BLOCK)
            w = (tl.load(code_ptr + nib) * a).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        # Epilogue: + xa B^T (xa = s * drop(x) A^T, [M, r]) and the bias.
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_xa_m + offs_r[None, :],
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        bt = tl.load(b_ptr + offs_n[:, None] * stride_b_n + offs_r[None, :],
                     mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(xa.dtype)
        if IEEE:
            acc += tl.dot(xa, tl.trans(bt), input_precision="ieee")
        else:
            acc += tl.dot(xa, tl.trans(bt))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_y_m + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One reused buffer per (shape, device, dtype): layers of one shape share it, so no per-layer
    dequantized copy of W ever stays alive."""
    key = (rows, cols, device, dtype)
    buf = _SCRATCH.get(key)
    if buf is None:
        buf = _SCRATCH[key] = torch.empty((rows, cols), device=device, dtype=dtype)
    return buf


def release_scratch() -> None:
    """Free the reused dequantization buffers (they stay allocated between calls; a peak-memory measurement
    that should count them starts from here)."""
    _SCRATCH.clear()


def _dequant_into(out: torch.Tensor, packed, absmax, absmax2, code2, offset, N, K, blocksize) -> torch.Tensor:
    # The kernel launcher itself: this runs inside memcomp::nf4_lora_linear's Triton path, so going through the
    # dispatcher and the memcomp::nf4_dequantize_into op again would only add their per-call overhead.
    return nf4_dequantize_forward(packed, absmax, (N, K), blocksize, out.dtype, absmax2, code2, offset, out=out)


def _fused_small_m(x, xa, packed, absmax, absmax2, code2, offset, N, K, blocksize, B, bias):
    M = x.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    R = B.shape[1]
    code = code_table(x.device)
    nested = absmax2 is not None
    # 64 x 64 weight tiles, 8 warps, 2 stages: at 4 warps / 3 stages the sm_90 build spilled 48 B per thread
    # (r = 16, nested absmax) and took 109 KB of shared memory; this compiles to 114 registers, no spills, 59 KB
    # (python -m memcomp.kernels.aot --only nf4_lora_linear). Not yet timed on a GPU.
    block_n, block_k = 64, 64
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, 16))
    _nf4_lora_linear_fwd_kernel[grid](
        x, packed, code, absmax, absmax2 if nested else code, code2 if nested else code,
        offset.reshape(1).float() if nested else code, xa, B, bias if bias is not None else code,
        y,
        M, N, K, R,
        x.stride(0), xa.stride(0), B.stride(0), y.stride(0),
        BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCK=NESTED_BLOCKSIZE, HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(R)),
        num_warps=8, num_stages=2, enable_fp_fusion=False,
    )
    return y


def nf4_lora_linear_forward(x, xd, packed, absmax, absmax2, code2, offset, N, K, blocksize, A, B, scaling, bias):
    """x [M, K] (and xd = drop(x) [M, K] or None for p = 0) -> (y [M, N], xa [M, r])."""
    dt = x.dtype
    lora_in = x if xd is None else xd
    xa = (lora_in @ A.to(dt).t()) * scaling
    bias_c = None if bias is None else bias.to(dt)
    M, r = x.shape[0], A.shape[0]
    if M <= SMALL_M:
        return _fused_small_m(x, xa.contiguous(), packed, absmax, absmax2, code2, offset, N, K, blocksize,
                              B.to(dt).contiguous(), bias_c), xa
    if xd is None and K < 2 * N:
        # Fold: y = [x | xa] [W | B]^T, one GEMM of depth K + r.
        buf = _scratch(N, K + r, x.device, dt)
        _dequant_into(buf[:, :K], packed, absmax, absmax2, code2, offset, N, K, blocksize)
        buf[:, K:].copy_(B)
        x_ext = torch.cat([x, xa], dim=1)
        y = F.linear(x_ext, buf, bias_c)
    else:
        W = _dequant_into(_scratch(N, K, x.device, dt), packed, absmax, absmax2, code2, offset, N, K, blocksize)
        y = F.linear(x, W, bias_c)
        y.addmm_(xa, B.to(dt).t())
    return y, xa


def nf4_lora_linear_backward(dy, x_or_xd, xa, packed, absmax, absmax2, code2, offset, N, K, blocksize, A, B,
                             scaling, has_xd: bool, need_dx: bool):
    """-> dx [M, K] (base path, plus the LoRA path when there is no separate xd), dxd [M, K] or empty,
    dA [r, K], dB [N, r], dbias [N] (fp32)."""
    dt = dy.dtype
    r = A.shape[0]
    du = (dy @ B.to(dt)) * scaling
    dB = (dy.t() @ xa.to(dt)).to(B.dtype)
    dA = (du.t() @ x_or_xd.to(dt)).to(A.dtype)
    dbias = dy.float().sum(0)
    dx = dxd = dy.new_empty((0, K))
    if need_dx and not has_xd and N < 2 * K:
        # Fold: dx = [dy | du] [W ; A], one GEMM of depth N + r.
        buf = _scratch(N + r, K, dy.device, dt)
        _dequant_into(buf[:N], packed, absmax, absmax2, code2, offset, N, K, blocksize)
        buf[N:].copy_(A)
        dx = torch.cat([dy, du], dim=1) @ buf
    elif need_dx:
        W = _dequant_into(_scratch(N, K, dy.device, dt), packed, absmax, absmax2, code2, offset, N, K, blocksize)
        dx = dy @ W
        if has_xd:
            dxd = du @ A.to(dt)
        else:
            dx.addmm_(du, A.to(dt))
    elif has_xd:
        dxd = du @ A.to(dt)
    return dx, dxd, dA, dB, dbias


# ----------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("memcomp::nf4_lora_linear", mutates_args=())
def _nf4_lora_linear_op(x: torch.Tensor, xd: Optional[torch.Tensor], packed: torch.Tensor, absmax: torch.Tensor,
                        absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor],
                        offset: Optional[torch.Tensor], N: int, K: int, blocksize: int, lora_A: torch.Tensor,
                        lora_B: torch.Tensor, scaling: float,
                        bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return nf4_lora_linear_forward(x, xd, packed, absmax, absmax2, code2, offset, N, K, blocksize, lora_A,
                                   lora_B, scaling, bias)


@_nf4_lora_linear_op.register_fake
def _(x, xd, packed, absmax, absmax2, code2, offset, N, K, blocksize, lora_A, lora_B, scaling, bias):
    return x.new_empty((x.shape[0], N)), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("memcomp::nf4_lora_linear_backward", mutates_args=())
def _nf4_lora_linear_backward_op(dy: torch.Tensor, x_or_xd: torch.Tensor, xa: torch.Tensor, packed: torch.Tensor,
                                 absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
                                 code2: Optional[torch.Tensor], offset: Optional[torch.Tensor], N: int, K: int,
                                 blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                                 has_xd: bool, need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor, torch.Tensor]:
    return nf4_lora_linear_backward(dy, x_or_xd, xa, packed, absmax, absmax2, code2, offset, N, K, blocksize,
                                    lora_A, lora_B, scaling, has_xd, need_dx)


@_nf4_lora_linear_backward_op.register_fake
def _(dy, x_or_xd, xa, packed, absmax, absmax2, code2, offset, N, K, blocksize, lora_A, lora_B, scaling, has_xd,
      need_dx):
    M = dy.shape[0]
    dx = dy.new_empty((M if need_dx else 0, K))
    dxd = dy.new_empty((M if has_xd else 0, K))
    return dx, dxd, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), dy.new_empty((N,),
                                                                                                  dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, xd, packed, absmax, absmax2, code2, offset, N, K, blocksize, A, B, scaling, bias = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.meta = (N, K, blocksize, scaling, xd is not None, None if bias is None else bias.dtype)
    # Only drop(x) (or x when p = 0) and xa are kept: the same as a plain LoRA layer, no dequantized W.
    ctx.save_for_backward(x if xd is None else xd, xa, packed, absmax, absmax2, code2, offset, A, B)


def _backward(ctx, dy, _dxa):
    x_or_xd, xa, packed, absmax, absmax2, code2, offset, A, B = ctx.saved_tensors
    N, K, blocksize, scaling, has_xd, bias_dtype = ctx.meta
    need_dx = bool(ctx.needs_input_grad[0])
    dx, dxd, dA, dB, dbias = _nf4_lora_linear_backward_op(
        dy.contiguous(), x_or_xd, xa, packed, absmax, absmax2, code2, offset, N, K, blocksize, A, B, scaling,
        has_xd, need_dx)
    return (dx if need_dx else None, dxd if has_xd else None, None, None, None, None, None, None, None, None,
            dA, dB, None, None if bias_dtype is None else dbias.to(bias_dtype))


_nf4_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Eager reference (oracle and CPU fallback)
# ----------------------------------------------------------------------------------------------------

def nf4_lora_linear_reference(x, xd, packed, absmax, absmax2, code2, offset, N, K, blocksize, A, B, scaling, bias):
    """Dequantize, then F.linear plus the LoRA path, all in eager PyTorch (differentiable in x, A, B, bias)."""
    W = nf4_dequantize_reference(packed, absmax, (N, K), blocksize, x.dtype, absmax2, code2, offset)
    lora_in = x if xd is None else xd
    return F.linear(x, W, None if bias is None else bias.to(x.dtype)) + scaling * F.linear(
        F.linear(lora_in, A.to(x.dtype)), B.to(x.dtype))


# ----------------------------------------------------------------------------------------------------
# Entry point (memcomp.fused.nf4_lora_linear wraps this with NF4Weight and dropout)
# ----------------------------------------------------------------------------------------------------

def nf4_lora_linear_raw(x2d, xd2d, packed, absmax, absmax2, code2, offset, N, K, blocksize, A, B, scaling, bias):
    if resolve("nf4_lora_linear", x2d, packed, A, B, bias) == "reference":
        return nf4_lora_linear_reference(x2d, xd2d, packed, absmax, absmax2, code2, offset, N, K, blocksize, A, B,
                                         scaling, bias)
    if interpreter_bf16(x2d, A, B, bias):  # the interpreter's bf16 tl.dot is wrong: fp32 copies, bf16 result
        up = lambda t: None if t is None else t.float()
        return nf4_lora_linear_raw(up(x2d), up(xd2d), packed, absmax, absmax2, code2, offset, N, K, blocksize,
                                   up(A), up(B), scaling, up(bias)).to(x2d.dtype)
    y, _ = _nf4_lora_linear_op(x2d, xd2d, packed, absmax, absmax2, code2, offset, N, K, blocksize, A, B,
                               float(scaling), bias)
    return y
