r"""packed_attention: attention within segments of a packed batch (varlen flash attention), GQA.

    out[t, h] = sum_{s in seg(t), s <= t if causal} softmax_s(scale * q[t, h] . k[s, h // G]) v[s, h // G]

Shapes: q [T, Hq, D], k and v [T, Hkv, D] with Hq = G * Hkv, cu_seqlens [n + 1] int32 -> out [T, Hq, D].
Online softmax in fp32; a T x T mask is never materialised.

Tiling. Query tiles run over the packed token axis, not per segment: a tile of BLOCK_M rows may span several
segments, and its key range is the union of its rows' segments (cut at the tile's last row when causal),
masked by per-row segment ids. For the encoder's 16-token chunks a 64-row tile holds four chunks and one
64 x 64 key block (a per-segment grid would pad every chunk to a whole tile); for long decoder segments the
tile lies inside one segment and this is ordinary flash attention. Backward: delta = rowsum(dO * O), then
one kernel per key tile and KV head accumulating dK, dV over the query heads of its group (no atomics),
and one kernel per query tile for dQ.

No GPU has timed this yet (bench/bench_packed_attention.py compares it with flash-attn varlen,
FlexAttention and the SDPA loop).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from memcomp.kernels._validate import check_cu_seqlens
from memcomp.kernels.backend import interpreter_bf16, resolve

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["packed_attention", "packed_attention_reference", "packed_attention_flex", "flex_block_mask",
           "segment_ids"]


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _key_range(cu_ptr, seg_ptr, first, last, CAUSAL: tl.constexpr):
        """Keys a query tile [first, last] can see: its rows' segments, cut at ``last`` when causal."""
        lo = tl.load(cu_ptr + tl.load(seg_ptr + first))
        hi = tl.load(cu_ptr + tl.load(seg_ptr + last) + 1)
        if CAUSAL:
            hi = tl.minimum(hi, last + 1)
        return lo, hi

    @triton.jit
    def _tile(idx, ok, head, stride_tok, stride_head, offs_d, d_ok):
        """Offsets and mask of a [len(idx), BLOCK_D] tile of rows ``idx`` of one head of a [T, H, D] tensor."""
        offsets = idx[:, None].to(tl.int64) * stride_tok + head * stride_head + offs_d[None, :]
        return offsets, ok[:, None] & d_ok[None, :]

    @triton.jit
    def _visible(seg_q, seg_k, rows, cols, row_ok, col_ok, CAUSAL: tl.constexpr):
        """[BLOCK_M, BLOCK_N] mask: same segment, both in range, and key not after query when causal."""
        keep = (seg_q[:, None] == seg_k[None, :]) & row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        return keep

    @triton.jit
    def _visible_t(seg_q, seg_k, rows, cols, row_ok, col_ok, CAUSAL: tl.constexpr):
        """The same mask transposed, [BLOCK_N, BLOCK_M] (keys along rows), built directly in that layout."""
        keep = (seg_k[:, None] == seg_q[None, :]) & col_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[:, None] <= rows[None, :])
        return keep

    @triton.jit
    def _packed_attention_fwd_kernel(
        # inputs
        q_ptr, k_ptr, v_ptr, cu_ptr, seg_ptr,
        # outputs
        o_ptr, lse_ptr,
        # strides
        stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
        stride_o_tok, stride_o_head,
        # sizes
        T, D, GROUP, scale,
        # compile-time
        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        hk = h // GROUP
        first = pid_m * BLOCK_M
        last = tl.minimum(first + BLOCK_M, T) - 1
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        seg_q = tl.load(seg_ptr + rows, mask=row_ok, other=-1)
        q_off, q_mask = _tile(rows, row_ok, h, stride_q_tok, stride_q_head, offs_d, d_ok)
        q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
        lo, hi = _key_range(cu_ptr, seg_ptr, first, last, CAUSAL)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < hi
            k_off, kv_mask = _tile(cols, col_ok, hk, stride_k_tok, stride_k_head, offs_d, d_ok)
            v_off, _ = _tile(cols, col_ok, hk, stride_v_tok, stride_v_head, offs_d, d_ok)
            k = tl.load(k_ptr + k_off, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + v_off, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            seg_k = tl.load(seg_ptr + cols, mask=col_ok, other=-2)
            s = tl.where(_visible(seg_q, seg_k, rows, cols, row_ok, col_ok, CAUSAL), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_off, _ = _tile(rows, row_ok, h, stride_o_tok, stride_o_head, offs_d, d_ok)
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=q_mask)
        tl.store(lse_ptr + h * T + rows, m_i + tl.log(l_safe), mask=row_ok)

    @triton.jit
    def _packed_attention_bwd_delta_kernel(
        # inputs (one layout)
        o_ptr, do_ptr,
        # output
        delta_ptr,
        # strides
        stride_o_tok, stride_o_head,
        # sizes
        T, D,
        # compile-time
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """delta[h, t] = sum_d dO[t, h, d] O[t, h, d] in fp64 (products of fp32-exact values are exact): on a
        row that sees one key the exact dq is 0 and ds = dp - delta is pure rounding, so delta adds none of its
        own (an fp32 delta doubled the dq error there). One read of O and dO in their own dtype."""
        pid = tl.program_id(0)
        h = tl.program_id(1)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        offs_d = tl.arange(0, BLOCK_D)
        off, mask = _tile(rows, row_ok, h, stride_o_tok, stride_o_head, offs_d, offs_d < D)
        o = tl.load(o_ptr + off, mask=mask, other=0.0).to(tl.float64)
        do = tl.load(do_ptr + off, mask=mask, other=0.0).to(tl.float64)
        tl.store(delta_ptr + h * T + rows, tl.sum(o * do, axis=1).to(tl.float32), mask=row_ok)

    @triton.jit
    def _packed_attention_bwd_dkdv_kernel(
        # inputs
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr, seg_ptr,
        # outputs
        dk_ptr, dv_ptr,
        # strides (q, do and dq share a layout; k, v, dk, dv share one)
        stride_q_tok, stride_q_head, stride_k_tok, stride_k_head,
        # sizes
        T, D, GROUP, scale,
        # compile-time
        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        hk = tl.program_id(1)
        first = pid_n * BLOCK_N
        last = tl.minimum(first + BLOCK_N, T) - 1
        cols = first + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        seg_k = tl.load(seg_ptr + cols, mask=col_ok, other=-2)
        kv_off, kv_mask = _tile(cols, col_ok, hk, stride_k_tok, stride_k_head, offs_d, d_ok)
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        # Queries that can see this key tile: its keys' segments, from the first key on when causal.
        q_lo = tl.load(cu_ptr + tl.load(seg_ptr + first))
        if CAUSAL:
            q_lo = first
        q_hi = tl.load(cu_ptr + tl.load(seg_ptr + last) + 1)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            for m0 in range(q_lo, q_hi, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                row_ok = rows < q_hi
                q_off, q_mask = _tile(rows, row_ok, h, stride_q_tok, stride_q_head, offs_d, d_ok)
                q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
                do = tl.load(do_ptr + q_off, mask=q_mask, other=0.0)
                lse = tl.load(lse_ptr + h * T + rows, mask=row_ok, other=0.0)
                delta = tl.load(delta_ptr + h * T + rows, mask=row_ok, other=0.0)
                seg_q = tl.load(seg_ptr + rows, mask=row_ok, other=-1)
                # Keys along rows throughout (S^T = K Q^T): P^T and dS^T come out of their dots in the layout
                # the dV and dK dots take as A operand, so no register tile is transposed.
                st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale
                keep = _visible_t(seg_q, seg_k, rows, cols, row_ok, col_ok, CAUSAL)
                pt = tl.where(keep, tl.exp(st - lse[None, :]), 0.0)
                dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
                dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                dst = pt * (dpt - delta[None, :]) * scale
                dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
        tl.store(dk_ptr + kv_off, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + kv_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _packed_attention_bwd_dq_kernel(
        # inputs
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr, seg_ptr,
        # output
        dq_ptr,
        # strides
        stride_q_tok, stride_q_head, stride_k_tok, stride_k_head,
        # sizes
        T, D, GROUP, scale,
        # compile-time
        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        hk = h // GROUP
        first = pid_m * BLOCK_M
        last = tl.minimum(first + BLOCK_M, T) - 1
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_off, q_mask = _tile(rows, row_ok, h, stride_q_tok, stride_q_head, offs_d, d_ok)
        q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
        do = tl.load(do_ptr + q_off, mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + h * T + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + h * T + rows, mask=row_ok, other=0.0)
        seg_q = tl.load(seg_ptr + rows, mask=row_ok, other=-1)
        lo, hi = _key_range(cu_ptr, seg_ptr, first, last, CAUSAL)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < hi
            kv_off, kv_mask = _tile(cols, col_ok, hk, stride_k_tok, stride_k_head, offs_d, d_ok)
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
            seg_k = tl.load(seg_ptr + cols, mask=col_ok, other=-2)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.where(_visible(seg_q, seg_k, rows, cols, row_ok, col_ok, CAUSAL), tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None]) * scale
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(dq_ptr + q_off, dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Segment index of every packed row, [T] int32 (no host sync: the output size is given)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device, dtype=torch.int32), lengths,
                                   output_size=total)


def _config(kernel: str, D: int, dtype: torch.dtype) -> dict:
    """Tiles, warps and pipeline stages of one kernel: constexprs and launch options.

    Chosen with ``python -m memcomp.kernels.aot`` (static resources off the sm_90 cubin): the deepest pipelining
    that compiles without register spills on sm_90 and fits sm_80's 163 KB of shared memory. The 64-row query
    tiles hold four 16-token chunks. At D = 128 in bf16 the old dK/dV configuration (64 x 64 tiles, 4 warps,
    3 stages, transposed register tiles) spilled 472 B per thread; keys-along-rows with 32-query steps and 8
    warps uses 192 registers and spills nothing. fp32 (tests, not a GPU training dtype) takes smaller tiles.
    Head dims 129-256 (Gemma-style) take 32-key tiles: the 64 x 64 ones overflowed sm_90's shared memory in dQ.
    """
    block_d = max(16, triton.next_power_of_2(D))
    if block_d > 256:
        raise NotImplementedError(f"packed_attention: the Triton kernels take head dims up to 256, got {D}; use "
                                  "impl='flash_attn' or impl='flex'")
    wide = block_d > 64
    fp32 = dtype == torch.float32
    if block_d > 128:
        cfg = {"fwd": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
               "dq": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
               "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2)}[kernel]
        if fp32:
            cfg.update(BLOCK_M=min(cfg["BLOCK_M"], 32), num_warps=4, num_stages=1)
    elif kernel == "fwd":
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if fp32 and wide else 4, num_stages=2 if fp32 else 3)
    elif kernel == "dq":
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1 if fp32 and wide else 2 if fp32 else 3)
    else:  # dkdv: BLOCK_N keys per program, BLOCK_M queries per step
        cfg = dict(BLOCK_M=32, BLOCK_N=32 if fp32 and wide else 64, num_warps=8 if wide else 4,
                   num_stages=2 if wide else 3)
    # fp32 inputs get IEEE products: the fp32 path exists for exactness (tests on a GPU hold it to eager fp32),
    # and TF32 carries 10-bit mantissas. Its FMA-loop dots spill heavily on sm_90; it is not a speed path.
    # 16-bit inputs ignore the setting.
    return dict(cfg, BLOCK_D=block_d, PRECISION="ieee" if fp32 else "tf32")


def packed_attention_forward(q, k, v, cu_seqlens, seg, causal: bool, scale: float):
    T, Hq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    if T == 0:
        return out, lse
    cfg = _config("fwd", D, q.dtype)
    _packed_attention_fwd_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), Hq)](
        q, k, v, cu_seqlens, seg,
        out, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        T, D, Hq // k.shape[1], scale,
        CAUSAL=causal, **cfg,
    )
    return out, lse


def packed_attention_backward(do, q, k, v, out, lse, cu_seqlens, seg, causal: bool, scale: float):
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    # The kernels read q, dO (and O) with one set of strides and k, v with another: no-ops for the usual
    # contiguous projections, copies for anything else.
    q, k, v, out, do = (t.contiguous() for t in (q, k, v, out, do))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if T == 0:
        return dq, dk, dv
    delta = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(D))
    _packed_attention_bwd_delta_kernel[(triton.cdiv(T, 16), Hq)](
        out, do, delta, out.stride(0), out.stride(1), T, D, BLOCK_T=16, BLOCK_D=block_d, num_warps=4)
    cfg = _config("dkdv", D, q.dtype)
    _packed_attention_bwd_dkdv_kernel[(triton.cdiv(T, cfg["BLOCK_N"]), Hkv)](
        q, k, v, do, lse, delta, cu_seqlens, seg,
        dk, dv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        T, D, Hq // Hkv, scale, CAUSAL=causal, **cfg)
    cfg = _config("dq", D, q.dtype)
    _packed_attention_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), Hq)](
        q, k, v, do, lse, delta, cu_seqlens, seg,
        dq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        T, D, Hq // Hkv, scale, CAUSAL=causal, **cfg)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("memcomp::packed_attention", mutates_args=())
def _packed_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    seg = segment_ids(cu_seqlens, q.shape[0])
    return packed_attention_forward(q, k, v, cu_seqlens, seg, causal, scale)


@_packed_attention_op.register_fake
def _(q, k, v, cu_seqlens, causal, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("memcomp::packed_attention_backward", mutates_args=())
def _packed_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
                                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seg = segment_ids(cu_seqlens, q.shape[0])
    return packed_attention_backward(do, q, k, v, out, lse, cu_seqlens, seg, causal, scale)


@_packed_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _packed_attention_backward_op(dout, q, k, v, out, lse, cu_seqlens, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


_packed_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Other backends: the eager reference (oracle and CPU fallback), FlexAttention, flash-attn
# ----------------------------------------------------------------------------------------------------

def packed_attention_reference(q, k, v, cu_seqlens, causal: bool = True, scale: Optional[float] = None):
    """PyTorch SDPA (math) per segment, with segments of equal length batched into one call (the encoder's
    chunks are all C long, so a CPU step makes a handful of calls instead of one per chunk). Differentiable."""
    G = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for s, n in zip(starts, lengths):
        if n:
            by_len.setdefault(n, []).append(s)
    for n, group in by_len.items():
        rows = (torch.tensor(group, device=q.device)[:, None] + torch.arange(n, device=q.device)).reshape(-1)
        qs, ks, vs = (t[rows].reshape(len(group), n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(G, 1), vs.repeat_interleave(G, 1)               # [S, H, n, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        out = out.index_copy(0, rows, o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2]))
    return out


@functools.cache
def _flex_attention(on_cuda: bool):
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled, flex_attention runs an unfused reference that materialises every score (28 x 64K^2 at the
    # encoder's shape); compiled once, it is the fused kernel the benchmarks compare against.
    return torch.compile(flex_attention, dynamic=False) if on_cuda else flex_attention


def flex_block_mask(cu_seqlens: torch.Tensor, T: int, causal: bool = True):
    """FlexAttention BlockMask of the packed segments (build once per cu_seqlens and reuse)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids(cu_seqlens, T)

    def mask_mod(b, h, qi, ki):
        same = seg[qi] == seg[ki]
        return same & (ki <= qi) if causal else same

    return create_block_mask(mask_mod, None, None, T, T, device=cu_seqlens.device, _compile=cu_seqlens.is_cuda)


def packed_attention_flex(q, k, v, cu_seqlens, causal: bool = True, scale: Optional[float] = None, block_mask=None):
    """PyTorch FlexAttention (compiled on CUDA) with a document block mask; GQA through enable_gqa."""
    if block_mask is None:
        block_mask = flex_block_mask(cu_seqlens, q.shape[0], causal)
    out = _flex_attention(q.is_cuda)(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                     block_mask=block_mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def packed_attention_flash_attn(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True,
                                scale: Optional[float] = None):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:
        raise ImportError("packed_attention(impl='flash_attn') needs flash-attn: pip install 'memcomp[flash]'") from exc
    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal)


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

IMPLS = ("auto", "triton", "reference", "flex", "flash_attn")


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: Optional[int] = None, causal: bool = True, softmax_scale: Optional[float] = None,
                     *, impl: str = "auto", check_inputs: bool = True) -> torch.Tensor:
    """Attention within each segment of a packed batch. ``impl``: "auto" (the dispatcher: Triton on CUDA or
    when forced, else the reference), or one backend by name: "triton", "reference", "flex", "flash_attn".
    ``check_inputs=False`` skips the value check of ``cu_seqlens`` (a host sync on a GPU); memcomp's own
    callers pass it with collator-built segments."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"packed_attention: q, k, v must be [T, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    T, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"packed_attention: k and v must be [T={T}, Hkv, D={D}], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if Hq % k.shape[1]:
        raise ValueError(f"packed_attention: Hq={Hq} is not a multiple of Hkv={k.shape[1]}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("packed_attention: cu_seqlens must be a 1-D int32 tensor [n + 1]")
    for name, t in (("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if t.device != q.device:
            raise ValueError(f"packed_attention: {name} is on {t.device} but q is on {q.device}")
    if impl not in IMPLS:
        raise ValueError(f"packed_attention: impl must be one of {IMPLS}, got {impl!r}")
    if check_inputs and not torch.compiler.is_compiling():  # a value check cannot be traced
        check_cu_seqlens(cu_seqlens, T)
    scale = float(softmax_scale) if softmax_scale is not None else D ** -0.5
    if impl == "auto":
        impl = resolve("packed_attention", q, k, v)
    if impl == "reference":
        return packed_attention_reference(q, k, v, cu_seqlens, causal, scale)
    if impl == "flex":
        return packed_attention_flex(q, k, v, cu_seqlens, causal, scale)
    if impl == "flash_attn":
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return packed_attention_flash_attn(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    if interpreter_bf16(q, k, v):  # the interpreter's bf16 tl.dot is wrong: fp32 copies, bf16 result
        return packed_attention(q.float(), k.float(), v.float(), cu_seqlens, max_seqlen, causal, scale,
                                impl="triton", check_inputs=False).to(q.dtype)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _ = _packed_attention_op(q, k, v, cu_seqlens.to(torch.int32), causal, scale)
    return out
