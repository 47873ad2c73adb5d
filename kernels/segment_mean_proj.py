r"""segment_mean_proj: RMSNorm -> per-segment mean -> linear projection (the compressor's pooling).

Math, for segment i = rows [s_i, e_i) of ``hidden``, L_i = e_i - s_i > 0, g = ``norm_weight``:

    r_t   = 1 / sqrt(mean_k h_{t,k}^2 + eps)                  (fp32, per row; r_t = 1 without a norm)
    u_t   = r_t * h_t                                          (the RMS-normalised row)
    p_i   = g * (1 / L_i) * sum_{t in i} u_t                   (pooled, [n, d])
    out_i = W p_i + b                                          ([n, d_out])

Shapes: hidden [T, d] (fp32/fp16/bf16), cu_seqlens [n + 1] int32 (0 = c_0 <= ... <= c_n = T, no empty
segment), weight [d_out, d], bias [d_out], norm_weight [d] -> out [n, d_out].

What is fused, and why. The encoder's final RMSNorm and the chunk mean are one Triton kernel: the
hidden states, by far the largest tensor (T x d; 0.94 GB at T = 131,072, d = 3,584 in bf16), are read
from HBM once, in fp32 registers, and only the n = T / C pooled rows are written. Eager PyTorch reads and
writes T x d three times (norm, weight multiply, mean). Each program owns one segment and sweeps its rows
twice: once for the row statistics, once to accumulate; for compressor chunks (C = 16 rows, 112 KiB at
d = 3,584 in bf16) the second sweep hits L2, so HBM sees one read. The projection is a GEMM on the pooled
rows, M = n = T / C, and goes to cuBLAS (a Triton GEMM does not beat it at these shapes). At C = 16 and
d = d_out = 3,584 its arithmetic intensity against the hidden-state bytes is d_out / C = 224 FLOP/B, at
the H200's ridge (~206), so pooling and projection cost about the same; bench/bench_segment_mean_proj.py
reports both floors and the measured fraction (GPU results, when run, land in bench/results/; none are
recorded yet, so the gain of the fusion is not yet measured).

Backward, with dout [n, d_out]: dW = dout^T p, db = sum_i dout_i, dp = dout W (cuBLAS), then
v_i = g * dp_i / L_i and, per row, dh_t = r_t v_i - r_t^3 (h_t . v_i) / d * h_t in one Triton kernel
(one HBM read of h, one write of dh), and dg = sum_i dp_i * mean_{t in i} u_t from the mean of u saved by
the forward (n x d fp32, 1/C of the hidden-state size in bf16 x 2).

Long segments are correct but one program walks them alone; the kernel is built for chunk-sized segments.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from memcomp.kernels._validate import check_cu_seqlens
from memcomp.kernels.backend import resolve

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

__all__ = [
    "segment_mean_proj",
    "segment_mean_proj_forward",
    "segment_mean_proj_backward",
    "segment_mean_proj_reference",
    "check_cu_seqlens",
]


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _segment_mean_proj_fwd_kernel(
        # inputs
        h_ptr, cu_ptr, g_ptr,
        # outputs
        pooled_ptr, mean_u_ptr, rstd_ptr,
        # strides
        stride_h_tok, stride_pooled_seg, stride_mean_seg,
        # sizes
        D, eps,
        # compile-time flags
        HAS_NORM: tl.constexpr, STORE_MEAN: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        seg = tl.program_id(0)
        start = tl.load(cu_ptr + seg)
        end = tl.load(cu_ptr + seg + 1)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)

        if HAS_NORM:
            # Sweep 1: per-row 1/rms, kept in rstd_ptr (also the backward's saved statistic).
            for t0 in range(start, end, BLOCK_T):
                rows = t0 + offs_t
                row_mask = rows < end
                row_off = rows.to(tl.int64) * stride_h_tok
                sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    cols = d0 + offs_d
                    mask = row_mask[:, None] & (cols < D)[None, :]
                    x = tl.load(h_ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0)
                    x = x.to(tl.float32)
                    sumsq += tl.sum(x * x, axis=1)
                rstd = 1.0 / tl.sqrt(sumsq / D + eps)
                tl.store(rstd_ptr + rows, rstd, mask=row_mask)
            # rstd rows written by one thread are read by others below.
            tl.debug_barrier()

        # Sweep 2: column block outer, so each pooled column block is finished in registers.
        inv_len = 1.0 / (end - start).to(tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            col_mask = cols < D
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for t0 in range(start, end, BLOCK_T):
                rows = t0 + offs_t
                row_mask = rows < end
                row_off = rows.to(tl.int64) * stride_h_tok
                mask = row_mask[:, None] & col_mask[None, :]
                x = tl.load(h_ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0)
                x = x.to(tl.float32)
                if HAS_NORM:
                    r = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
                    x = x * r[:, None]
                acc += tl.sum(x, axis=0)
            mean_u = acc * inv_len
            if STORE_MEAN:
                tl.store(mean_u_ptr + seg.to(tl.int64) * stride_mean_seg + cols, mean_u, mask=col_mask)
            if HAS_NORM:
                g = tl.load(g_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                mean_u = mean_u * g
            tl.store(pooled_ptr + seg.to(tl.int64) * stride_pooled_seg + cols,
                     mean_u.to(pooled_ptr.dtype.element_ty), mask=col_mask)

    @triton.jit
    def _bwd_load_tiles(h_ptr, g_ptr, dp_row, h_off, row_mask, cols, D, inv_len):
        """One column block of the backward: v = g * dp_i / L_i ([BLOCK_D], fp32) and the h tile (fp32)."""
        col_mask = cols < D
        v = tl.load(dp_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        v = v * tl.load(g_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) * inv_len
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(h_ptr + h_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        return v, x, mask

    @triton.jit
    def _segment_mean_proj_bwd_kernel(
        # inputs
        h_ptr, cu_ptr, g_ptr, rstd_ptr, dp_ptr,
        # outputs
        dh_ptr,
        # strides
        stride_h_tok, stride_dp_seg, stride_dh_tok,
        # sizes
        D,
        # compile-time flags
        HAS_NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        seg = tl.program_id(0)
        start = tl.load(cu_ptr + seg)
        end = tl.load(cu_ptr + seg + 1)
        inv_len = 1.0 / (end - start).to(tl.float32)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        dp_row = dp_ptr + seg.to(tl.int64) * stride_dp_seg

        for t0 in range(start, end, BLOCK_T):
            rows = t0 + offs_t
            row_mask = rows < end
            h_off = rows.to(tl.int64) * stride_h_tok
            dh_off = rows.to(tl.int64) * stride_dh_tok
            if HAS_NORM:
                r = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
                # Sweep 1: h_t . v_i for each row (v_i = g * dp_i / L_i).
                dot = tl.zeros([BLOCK_T], dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    v, x, mask = _bwd_load_tiles(h_ptr, g_ptr, dp_row, h_off, row_mask, d0 + offs_d, D, inv_len)
                    dot += tl.sum(x * v[None, :], axis=1)
                c = r * r * r * dot / D
                # Sweep 2: dh = r v - c h.
                for d0 in range(0, D, BLOCK_D):
                    cols = d0 + offs_d
                    v, x, mask = _bwd_load_tiles(h_ptr, g_ptr, dp_row, h_off, row_mask, cols, D, inv_len)
                    dh = r[:, None] * v[None, :] - c[:, None] * x
                    tl.store(dh_ptr + dh_off[:, None] + cols[None, :],
                             dh.to(dh_ptr.dtype.element_ty), mask=mask)
            else:
                for d0 in range(0, D, BLOCK_D):
                    cols = d0 + offs_d
                    col_mask = cols < D
                    v = tl.load(dp_row + cols, mask=col_mask, other=0.0).to(tl.float32) * inv_len
                    mask = row_mask[:, None] & col_mask[None, :]
                    dh = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32) + v[None, :]
                    tl.store(dh_ptr + dh_off[:, None] + cols[None, :],
                             dh.to(dh_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _block_sizes(d: int) -> tuple[int, int, int]:
    # [16, 512] fp32 tiles: 64 values per thread at 4 warps, no spills; 16 rows = one C = 16 chunk.
    block_d = min(512, triton.next_power_of_2(d))
    return 16, block_d, 4


def _check_tensors(hidden: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor]) -> None:
    """Shape, dtype and device checks that need no host sync (values of cu_seqlens: check_cu_seqlens)."""
    if hidden.dim() != 2:
        raise ValueError(f"segment_mean_proj: hidden must be [T, d], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"segment_mean_proj: hidden must be fp32/fp16/bf16, got {hidden.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("segment_mean_proj: cu_seqlens must be 1-D with n + 1 >= 2 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"segment_mean_proj: cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    d = hidden.shape[1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"segment_mean_proj: weight must be [d_out, d={d}], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"segment_mean_proj: bias must be [d_out={weight.shape[0]}], got {tuple(bias.shape)}")
    if norm_weight is not None and tuple(norm_weight.shape) != (d,):
        raise ValueError(f"segment_mean_proj: norm_weight must be [d={d}], got {tuple(norm_weight.shape)}")
    for name, t in (("cu_seqlens", cu_seqlens), ("weight", weight), ("bias", bias),
                    ("norm_weight", norm_weight)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"segment_mean_proj: {name} is on {t.device} but hidden is on {hidden.device}")
    for name, t in (("weight", weight), ("bias", bias), ("norm_weight", norm_weight)):
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"segment_mean_proj: {name} must be floating point, got {t.dtype}")


def segment_mean_proj_forward(hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                              norm_weight: Optional[torch.Tensor], eps: float, store_mean: bool):
    """Launch the fused RMSNorm + segment-mean kernel.

    Returns pooled [n, d] (hidden's dtype, norm weight applied), mean_u [n, d] fp32 (the mean of the
    normalised rows before the norm weight; empty unless ``store_mean``) and rstd [T] fp32 (empty without
    a norm).
    """
    # Rows may be strided (the kernel takes stride_h_tok); only the feature dim must be unit-stride.
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    cu = cu_seqlens.to(torch.int32).contiguous()
    T, d = hidden.shape
    n = cu.numel() - 1
    has_norm = norm_weight is not None
    pooled = torch.empty((n, d), device=hidden.device, dtype=hidden.dtype)
    mean_u = torch.empty((n if store_mean else 0, d), device=hidden.device, dtype=torch.float32)
    rstd = torch.empty((T if has_norm else 0,), device=hidden.device, dtype=torch.float32)
    if n == 0:
        return pooled, mean_u, rstd
    g = norm_weight.contiguous() if has_norm else pooled  # dummy pointer when HAS_NORM is False
    block_t, block_d, num_warps = _block_sizes(d)
    _segment_mean_proj_fwd_kernel[(n,)](
        hidden, cu, g,
        pooled, mean_u if store_mean else pooled, rstd if has_norm else pooled,
        hidden.stride(0), pooled.stride(0), d,
        d, eps,
        HAS_NORM=has_norm, STORE_MEAN=store_mean, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return pooled, mean_u, rstd


def segment_mean_proj_backward(dpooled: torch.Tensor, hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                               norm_weight: Optional[torch.Tensor], rstd: torch.Tensor) -> torch.Tensor:
    """Launch the backward kernel: d(pooled) [n, d] -> d(hidden) [T, d] in hidden's dtype."""
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    dpooled = dpooled.contiguous()
    cu = cu_seqlens.to(torch.int32).contiguous()
    T, d = hidden.shape
    n = cu.numel() - 1
    dh = torch.empty((T, d), device=hidden.device, dtype=hidden.dtype)
    if n == 0 or T == 0:
        return dh
    has_norm = norm_weight is not None
    block_t, block_d, num_warps = _block_sizes(d)
    _segment_mean_proj_bwd_kernel[(n,)](
        hidden, cu, norm_weight.contiguous() if has_norm else dpooled, rstd if has_norm else dpooled,
        dpooled,
        dh,
        hidden.stride(0), dpooled.stride(0), dh.stride(0),
        d,
        HAS_NORM=has_norm, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return dh


# ----------------------------------------------------------------------------------------------------
# torch.library registration: memcomp::segment_mean_proj (+ its backward), fake impls, autograd
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("memcomp::segment_mean_proj", mutates_args=())
def _segment_mean_proj_op(hidden: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor], eps: float,
                          save_for_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    pooled, mean_u, rstd = segment_mean_proj_forward(hidden, cu_seqlens, norm_weight, eps, save_for_backward)
    out = F.linear(pooled, weight.to(pooled.dtype), None if bias is None else bias.to(pooled.dtype))
    return out, pooled, mean_u, rstd


@_segment_mean_proj_op.register_fake
def _(hidden, cu_seqlens, weight, bias, norm_weight, eps, save_for_backward):
    n = cu_seqlens.shape[0] - 1
    T, d = hidden.shape
    out = hidden.new_empty((n, weight.shape[0]))
    pooled = hidden.new_empty((n, d))
    mean_u = hidden.new_empty((n if save_for_backward else 0, d), dtype=torch.float32)
    rstd = hidden.new_empty((T if norm_weight is not None else 0,), dtype=torch.float32)
    return out, pooled, mean_u, rstd


@torch.library.custom_op("memcomp::segment_mean_proj_backward", mutates_args=())
def _segment_mean_proj_backward_op(dout: torch.Tensor, hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                                   weight: torch.Tensor, norm_weight: Optional[torch.Tensor],
                                   pooled: torch.Tensor, mean_u: torch.Tensor, rstd: torch.Tensor,
                                   need_dhidden: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    dout = dout.to(pooled.dtype)
    dweight = (dout.t() @ pooled).to(weight.dtype)
    dbias = dout.float().sum(0)
    dpooled = dout @ weight.to(pooled.dtype)
    if norm_weight is not None:
        dnorm = (dpooled.float() * mean_u).sum(0).to(norm_weight.dtype)
    else:
        dnorm = dout.new_empty((0,))
    if need_dhidden:
        dhidden = segment_mean_proj_backward(dpooled, hidden, cu_seqlens, norm_weight, rstd)
    else:  # frozen encoder: skip the T x d pass
        dhidden = hidden.new_empty((0, hidden.shape[1]))
    return dhidden, dweight, dbias, dnorm


@_segment_mean_proj_backward_op.register_fake
def _(dout, hidden, cu_seqlens, weight, norm_weight, pooled, mean_u, rstd, need_dhidden):
    dnorm = (norm_weight.new_empty(norm_weight.shape) if norm_weight is not None else dout.new_empty((0,)))
    return (hidden.new_empty(hidden.shape if need_dhidden else (0, hidden.shape[1])), weight.new_empty(weight.shape),
            dout.new_empty((weight.shape[0],), dtype=torch.float32), dnorm)


def _setup_context(ctx, inputs, output):
    hidden, cu_seqlens, weight, bias, norm_weight, eps, save_for_backward = inputs
    _, pooled, mean_u, rstd = output
    ctx.mark_non_differentiable(pooled, mean_u, rstd)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(hidden, cu_seqlens, weight, norm_weight, pooled, mean_u, rstd)


def _backward(ctx, dout, _dpooled, _dmean, _drstd):
    hidden, cu_seqlens, weight, norm_weight, pooled, mean_u, rstd = ctx.saved_tensors
    if mean_u.shape[0] != pooled.shape[0]:
        raise RuntimeError("segment_mean_proj: backward through a call made with save_for_backward=False")
    dhidden, dweight, dbias, dnorm = _segment_mean_proj_backward_op(
        dout, hidden, cu_seqlens, weight, norm_weight, pooled, mean_u, rstd, bool(ctx.needs_input_grad[0]))
    dbias = dbias.to(ctx.bias_dtype) if ctx.has_bias else None
    return (dhidden if ctx.needs_input_grad[0] else None, None, dweight, dbias,
            dnorm if norm_weight is not None else None, None, None)


_segment_mean_proj_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Eager reference: the test oracle and the CPU fallback
# ----------------------------------------------------------------------------------------------------

def segment_mean_proj_reference(hidden: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor,
                                bias: Optional[torch.Tensor] = None,
                                norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """Eager PyTorch: Qwen2-style RMSNorm (fp32 statistics), per-segment mean, linear. Differentiable."""
    x = hidden
    if norm_weight is not None:
        xf = x.float()
        x = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        x = (norm_weight * x.to(hidden.dtype)).to(hidden.dtype)  # Qwen2RMSNorm's rounding order
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    seg_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=hidden.device), lengths,
                                      output_size=hidden.shape[0])
    sums = torch.zeros((lengths.numel(), x.shape[1]), device=x.device, dtype=torch.float32)
    sums = sums.index_add(0, seg_ids, x.float())
    pooled = (sums / lengths.clamp(min=1).unsqueeze(1).float()).to(hidden.dtype)
    return F.linear(pooled, weight.to(pooled.dtype), None if bias is None else bias.to(pooled.dtype))


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

def segment_mean_proj(hidden: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
                      eps: float = 1e-6, *, check_inputs: bool = True) -> torch.Tensor:
    """``[T, d]`` hidden rows, ``cu_seqlens [n + 1]`` -> ``[n, d_out]``: RMSNorm, segment mean, linear.

    ``check_inputs=False`` skips the value check of ``cu_seqlens`` (one host sync when it is on a GPU);
    callers that built it themselves (the compressor) pass False on the hot path.
    """
    _check_tensors(hidden, cu_seqlens, weight, bias, norm_weight)
    if check_inputs and not torch.compiler.is_compiling():  # a value check cannot be traced
        check_cu_seqlens(cu_seqlens, hidden.shape[0])
    if resolve("segment_mean_proj", hidden, weight, bias, norm_weight) == "reference":
        return segment_mean_proj_reference(hidden, cu_seqlens, weight, bias, norm_weight, eps)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias, norm_weight))
    out, _, _, _ = _segment_mean_proj_op(hidden, cu_seqlens, weight, bias, norm_weight, float(eps), save)
    return out
