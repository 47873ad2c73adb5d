r"""nf4_dequantize: 4-bit NormalFloat weights, stored byte-for-byte as bitsandbytes stores them.

Format (bitsandbytes ``quantize_4bit(w, blocksize, quant_type="nf4")``): the row-major flattened weight
(n = N * K elements) is cut into blocks of ``blocksize`` (64) consecutive elements, the last one possibly
partial. Per block, absmax a_b = max |w|; every element is scaled into [-1, 1] (multiplied by 1 / a_b in
full blocks, divided by a_b in the partial last block -- bitsandbytes' own rule) and mapped to the nearest
of the 16 NF4 code values (a value exactly on a midpoint goes to the lower code). Two codes per byte: the
even element in the high nibble, the odd one in the low nibble; an odd count is padded with code 7 (0.0).

    w[e] ~= NF4[code[e]] * a[e // blocksize]                                  packed [ceil(n / 2)] uint8

Double quantization ("compress_statistics"): offset = mean(a); (a - offset) is quantized blockwise in
blocks of 256 with the signed 8-bit dynamic map (one fp32 absmax per 256 blocks), so absmax costs
8 + 32 / 256 bits per 64 weights: 4.127 bits per parameter in all. Packed codes, absmax, offset, nested
absmax and code map equal bitsandbytes' exactly. The nested 8-bit codes are the exactly nearest code;
bitsandbytes' native CPU quantizer is not exactly nearest (values within ~2^-14 of a code midpoint, and a
coarse search among the tiny codes near zero) and differs on ~0.1-2 % of absmax values, by less than the
code spacing; both decode through the same stored state, and from_bnb / to_bnb carry bytes through
unchanged, so checkpoints round-trip losslessly. (bitsandbytes' own generic PyTorch path, the one its
CPU backend falls back to, agrees with ours.)

    a[b] = DYN[qa[b]] * a2[b // 256] + offset

The Triton kernel dequantizes one tile of elements per program, nested absmax included (it reads
0.53 bytes per weight and writes 2; memory-bound by construction). Quantization runs in PyTorch (vectorised
bucketize, fine on a GPU for a 7B model; bench/bench_nf4_dequantize.py times both).

Registered as the custom ops ``memcomp::nf4_dequantize`` (a new tensor) and ``memcomp::nf4_dequantize_into``
(``out=``, a declared mutation), with fake implementations and no autograd formula: the weight is frozen.
"""

from __future__ import annotations

from typing import Optional

import torch
from memcomp.kernels.backend import resolve

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = [
    "NF4_CODE", "VALID_BLOCKSIZES", "dynamic_map", "nf4_quantize_reference", "quantize_absmax_nested",
    "dequantize_absmax_nested", "nf4_dequantize_reference", "nf4_dequantize_forward", "nf4_dequantize",
]

# The 16 NF4 values, ascending (public format constants of bitsandbytes / QLoRA).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


_CODE_TABLES: dict[torch.device, torch.Tensor] = {}


def code_table(device: torch.device) -> torch.Tensor:
    """NF4_CODE on ``device``, copied once: a host-to-device copy per call would synchronise the stream. Not
    kept when made under a fake-tensor mode (tracing) or while a CUDA graph is being captured."""
    table = _CODE_TABLES.get(device)
    if table is None:
        table = NF4_CODE.to(device)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing and torch._guards.detect_fake_mode() is None:
            _CODE_TABLES[device] = table
    return table


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic quantization map (256 sorted fp32 values) used for nested absmax.

    Seven decades 10^-6 .. 10^0; decade i holds 2^i linearly spaced magnitudes (midpoints of an fp32
    linspace over [0.1, 1], scaled in fp32) with both signs; plus 0 and 1. Equal to bitsandbytes' map
    bit for bit (tests/kernels/test_nf4_dequantize.py).
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0 * (10.0 ** (i - 6))
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _nf4_block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask,
                          NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr):
        """absmax of block ``blk``: fp32 as stored, or decoded from the nested 8-bit state. Launch with
        enable_fp_fusion=False: bitsandbytes rounds the product and the sum apart, and an FMA here differs from
        it by an ulp on ~6 % of blocks (sm_90 contracts them otherwise; the interpreter never does)."""
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            a = tl.load(code2_ptr + qa) * tl.load(absmax2_ptr + blk // NESTED_BLOCK, mask=mask, other=0.0)
            a = a + tl.load(offset_ptr)
        else:
            a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        return a

    @triton.jit
    def _nf4_dequantize_fwd_kernel(
        # inputs
        packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
        # output (rows of K elements, row stride stride_out_row: a view into a wider buffer is fine)
        out_ptr, stride_out_row,
        # sizes
        n_elements, K,
        # compile-time
        BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, BLOCK_BYTES: tl.constexpr,
        CONTIGUOUS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        byte_idx = pid.to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        byte_mask = byte_idx * 2 < n_elements
        b = tl.load(packed_ptr + byte_idx, mask=byte_mask, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (b >> 4))   # even element
        lo = tl.load(code_ptr + (b & 15))   # odd element
        vals = tl.reshape(tl.join(hi, lo), [2 * BLOCK_BYTES])
        elem = pid.to(tl.int64) * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
        mask = elem < n_elements
        a = _nf4_block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, elem // BLOCKSIZE, mask, NESTED,
                              NESTED_BLOCK)
        if CONTIGUOUS:
            dst = elem
        else:  # rows of a wider buffer: a 64-bit division per element, only on this path
            row = elem // K
            dst = row * stride_out_row + (elem - row * K)
        tl.store(out_ptr + dst, (vals * a).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------

def _check(packed, absmax, n, blocksize, absmax2, code2, offset):
    if packed.dtype != torch.uint8:
        raise TypeError(f"nf4: packed codes must be uint8, got {packed.dtype}")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"nf4: {n} elements need {(n + 1) // 2} packed bytes, got {packed.numel()}")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"nf4: blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    blocks = -(-n // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"nf4: {n} elements in blocks of {blocksize} need {blocks} absmax values, "
                         f"got {absmax.numel()}")
    nested = absmax2 is not None
    if nested != (absmax.dtype == torch.uint8) or nested != (code2 is not None) or nested != (offset is not None):
        raise ValueError("nf4: nested absmax needs uint8 absmax codes plus absmax2, code2 and offset together")
    if not nested and absmax.dtype != torch.float32:
        raise TypeError(f"nf4: absmax must be fp32 (or uint8 when nested), got {absmax.dtype}")
    for name, t in (("absmax", absmax), ("absmax2", absmax2), ("code2", code2), ("offset", offset)):
        if t is not None and t.device != packed.device:
            raise ValueError(f"nf4: {name} is on {t.device} but the packed codes are on {packed.device}")


def nf4_dequantize_forward(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], blocksize: int,
                           dtype: torch.dtype, absmax2: Optional[torch.Tensor] = None,
                           code2: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the dequantize kernel. ``out`` may be a reused scratch buffer, or (2-D) a row-strided view into a
    wider one (unit stride along the last dim)."""
    n = 1
    for s in shape:
        n *= s
    if out is None:
        out = torch.empty(shape, device=packed.device, dtype=dtype)
    if n == 0:
        return out
    contiguous = out.is_contiguous()
    if (tuple(out.shape) != tuple(shape) or out.device != packed.device
            or not contiguous and (out.dim() != 2 or out.stride(1) != 1)):
        raise ValueError(f"nf4: out must be {tuple(shape)} on {packed.device}, contiguous or a 2-D view with unit "
                         f"stride along the last dim, got {tuple(out.shape)} strides {out.stride()} on {out.device}")
    K = shape[-1]
    row_stride = K if contiguous else out.stride(0)
    code = code_table(packed.device)
    nested = absmax2 is not None
    block_bytes = 1024
    grid = (triton.cdiv((n + 1) // 2, block_bytes),)
    _nf4_dequantize_fwd_kernel[grid](
        packed.reshape(-1), code, absmax.reshape(-1),
        absmax2 if nested else code, code2 if nested else code,
        offset.reshape(1).float() if nested else code,
        out, row_stride,
        n, K,
        BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCK=NESTED_BLOCKSIZE, BLOCK_BYTES=block_bytes,
        CONTIGUOUS=contiguous, num_warps=4, enable_fp_fusion=False,
    )
    return out


# ----------------------------------------------------------------------------------------------------
# References (oracle and CPU fallback) and quantization (PyTorch on any device)
# ----------------------------------------------------------------------------------------------------

def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' blockwise scaling of an fp32 vector: (scaled values, stored absmax)."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


def nf4_quantize_reference(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize any-shape ``weight`` -> (packed uint8 [ceil(n / 2)], absmax fp32 [ceil(n / blocksize)])."""
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"nf4: blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    scaled, absmax = _blockwise_scale(weight.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    code = NF4_CODE.to(weight.device)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


def quantize_absmax_nested(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of fp32 absmax -> (codes uint8 [nb], absmax2 fp32 [ceil(nb / 256)], code2, offset)."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    pad = (-n) % NESTED_BLOCKSIZE
    blocks = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, NESTED_BLOCKSIZE)
    absmax2 = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax2).unsqueeze(1)).reshape(-1)[:n]
    code2 = dynamic_map().to(absmax.device)
    q = torch.bucketize(scaled, (code2[:-1] + code2[1:]) / 2)
    # A block whose centred absmax is all zero scales to 0/0: bitsandbytes writes code 0 there.
    q = torch.where(torch.isnan(scaled), torch.zeros_like(q), q).to(torch.uint8)
    return q, absmax2, code2, offset


def dequantize_absmax_nested(q: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor,
                             offset: torch.Tensor) -> torch.Tensor:
    blocks = torch.arange(q.numel(), device=q.device) // NESTED_BLOCKSIZE
    return code2[q.long()] * absmax2[blocks] + offset


def nf4_dequantize_reference(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], blocksize: int,
                             dtype: torch.dtype, absmax2: Optional[torch.Tensor] = None,
                             code2: Optional[torch.Tensor] = None,
                             offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    if absmax2 is not None:
        absmax = dequantize_absmax_nested(absmax, absmax2, code2, offset)
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()
    blocks = torch.arange(n, device=packed.device) // blocksize
    return (code_table(packed.device)[codes] * absmax[blocks]).to(dtype).reshape(shape)


# ----------------------------------------------------------------------------------------------------
# torch.library registration: memcomp::nf4_dequantize, and memcomp::nf4_dequantize_into for out=
# ----------------------------------------------------------------------------------------------------
# No autograd formula: the NF4 weight is frozen (packed codes are uint8, absmax is quantization state, not a
# parameter), so nothing is differentiable; backward through either op raises PyTorch's "no autograd" error.
# ``impl`` ("triton" | "reference") is an argument, chosen by the resolver before the call, so a compiled graph
# keeps the implementation it was traced with and opcheck covers both.
#
# out= is a second op: an op's output may not alias an input, so the functional op cannot return a caller's
# buffer. The fused NF4 + LoRA linear dequantizes into a reused scratch buffer (or the left columns of a wider
# [N, K + r] one) on every call; as a registered mutation (mutates_args=("out",)) that path is also opcheck-clean
# and torch.compile functionalises it, row-strided views included, instead of tracing into a kernel launch.

@torch.library.custom_op("memcomp::nf4_dequantize", mutates_args=())
def _nf4_dequantize_op(packed: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
                       code2: Optional[torch.Tensor], offset: Optional[torch.Tensor], shape: list[int], blocksize: int,
                       dtype: torch.dtype, impl: str) -> torch.Tensor:
    if impl == "reference":
        return nf4_dequantize_reference(packed, absmax, tuple(shape), blocksize, dtype, absmax2, code2, offset)
    return nf4_dequantize_forward(packed, absmax, tuple(shape), blocksize, dtype, absmax2, code2, offset)


@_nf4_dequantize_op.register_fake
def _(packed, absmax, absmax2, code2, offset, shape, blocksize, dtype, impl):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("memcomp::nf4_dequantize_into", mutates_args=("out",))
def _nf4_dequantize_into_op(packed: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
                            code2: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int, impl: str,
                            out: torch.Tensor) -> None:
    shape = tuple(out.shape)
    if impl == "reference":
        out.copy_(nf4_dequantize_reference(packed, absmax, shape, blocksize, out.dtype, absmax2, code2, offset))
    else:
        nf4_dequantize_forward(packed, absmax, shape, blocksize, out.dtype, absmax2, code2, offset, out=out)


@_nf4_dequantize_into_op.register_fake
def _(packed, absmax, absmax2, code2, offset, blocksize, impl, out):
    return None


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

def _check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """The same rule for both implementations: the launcher writes rows through a row stride only."""
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(f"nf4: out must be {shape} {dtype} on {device}, got {tuple(out.shape)} {out.dtype} on "
                         f"{out.device}")
    if not out.is_contiguous() and (out.dim() != 2 or out.stride(1) != 1):
        raise ValueError(f"nf4: out must be contiguous or a 2-D view with unit stride along the last dim, got "
                         f"strides {out.stride()} for shape {tuple(out.shape)}")


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], blocksize: int,
                   dtype: torch.dtype, absmax2: Optional[torch.Tensor] = None, code2: Optional[torch.Tensor] = None,
                   offset: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Packed NF4 (+ absmax, optionally nested) -> dense ``shape`` in ``dtype``.

    Args:
        packed: uint8 [ceil(n / 2)], n = prod(shape), two codes per byte (even element in the high nibble).
        absmax: fp32 [ceil(n / blocksize)], or uint8 nested codes with ``absmax2`` fp32 [ceil(n_blocks / 256)],
            ``code2`` fp32 [256] and ``offset`` fp32 scalar (all four, or none of the nested three).
        shape: the dense shape (any rank); blocksize: one of ``VALID_BLOCKSIZES``; dtype: a floating dtype.
        out: optional buffer to write into (``shape``, ``dtype``, packed's device; contiguous, or a 2-D view with
            unit stride along the last dim such as the left columns of a wider buffer); it is returned.

    The backend resolver picks the Triton kernel (CUDA, or CPU in the interpreter) or the eager reference; both run
    as the custom ops ``memcomp::nf4_dequantize`` / ``memcomp::nf4_dequantize_into`` (out=). Not differentiable
    (the weight is frozen).

    Raises:
        TypeError / ValueError on a wrong dtype, byte or absmax count, blocksize, nested state, device, shape or
        ``out``.
    """
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"nf4: shape must be non-negative sizes, got {tuple(shape)}")
    shape = tuple(int(s) for s in shape)
    if not dtype.is_floating_point:
        raise TypeError(f"nf4: dequantize to a floating dtype, got {dtype}")
    n = 1
    for s in shape:
        n *= s
    _check(packed, absmax, n, blocksize, absmax2, code2, offset)
    impl = resolve("nf4_dequantize", packed)
    if out is None:
        return _nf4_dequantize_op(packed, absmax, absmax2, code2, offset, list(shape), blocksize, dtype, impl)
    _check_out(out, shape, dtype, packed.device)
    _nf4_dequantize_into_op(packed, absmax, absmax2, code2, offset, blocksize, impl, out)
    return out
