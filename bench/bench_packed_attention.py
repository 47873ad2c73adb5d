"""packed_attention at Qwen2.5-7B attention shapes (Hq 28, Hkv 4, D 128), bf16, forward / backward / both:
* encoder: T = 65,536 tokens in 16-token segments;
* decoder: one row of 8,192 tokens with segment lengths drawn from 256-4,096;
ours against flash-attn varlen (when installed), FlexAttention (compiled, document block mask) and the
per-segment SDPA loop (the decoder only: 4,096 launches make the encoder loop meaningless). Reports
TFLOP/s and the fraction of the op's floor (max of bytes over bandwidth, FLOPs over the GEMM rate).
Targets (H200): encoder >= 3x flash-attn varlen and within 1.5x of its floor; decoder fwd+bwd >= 0.9x
flash-attn varlen and >= 1.2x FlexAttention. On a CPU: tiny smoke shapes."""

import functools
import importlib.util
import random

import pytest
import torch
from benchutil import DEVICE, HAS_CUDA, MODES, Unavailable, floor_ms, mode_callable, per_s
from memcomp.kernels.packed_attention import flex_block_mask, packed_attention_flex

from memcomp.fused import packed_attention, use_backend

BASELINES = ("flash_attn", "flex", "sdpa_loop")
COLUMNS = ["case", "T", "mode", "impl", "median_ms", "p20_ms", "p80_ms", "TFLOP/s", "floor_frac",
           *(f"speedup_vs_{b}" for b in BASELINES)]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
HQ, HKV, D = (28, 4, 128) if HAS_CUDA else (4, 2, 32)
WARMUP, RUNS = (5, 30) if HAS_CUDA else (1, 3)


def _lengths(case):
    if case == "encoder":
        return [16] * (4096 if HAS_CUDA else 8)
    rng, out, total = random.Random(0), [], 8192 if HAS_CUDA else 96
    lo, hi = (256, 4096) if HAS_CUDA else (8, 40)
    while total > 0:
        n = min(total, rng.randint(lo, hi))
        out.append(n)
        total -= n
    return out


def _impl(name, case, cu, T):
    """The attention function (q, k, v, cu, max_seqlen) -> out of one implementation."""
    if name == "ours":
        def f(q, k, v, cu, m):
            with use_backend("triton"):
                return packed_attention(q, k, v, cu, m)
        return f
    if name == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            raise Unavailable("flash-attn not installed (pip install 'memcomp[flash]')")
        return lambda q, k, v, cu, m: packed_attention(q, k, v, cu, m, impl="flash_attn")
    if name == "flex":
        if not HAS_CUDA:
            raise Unavailable("FlexAttention has no CPU backward; compiled flex needs a GPU")
        block_mask = flex_block_mask(cu, T, causal=True)  # built once, outside the timed region
        return lambda q, k, v, cu, m: packed_attention_flex(q, k, v, cu, causal=True, block_mask=block_mask)
    if case == "encoder" and HAS_CUDA:
        raise Unavailable("4,096 SDPA launches: not a meaningful baseline")
    return lambda q, k, v, cu, m: packed_attention(q, k, v, cu, m, impl="reference")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["encoder", "decoder"])
def test_packed_attention(bench, case, mode):
    """One layout and mode: ours, flash-attn varlen, FlexAttention and the SDPA loop timed here."""
    lengths = _lengths(case)
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(T, h, D, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_() for h in (HQ, HKV, HKV))
    do = torch.randn(T, HQ, D, device=DEVICE, dtype=DTYPE)

    def make(name):
        fn = _impl(name, case, cu, T)
        return mode_callable(mode, lambda: fn(q, k, v, cu, max(lengths)), (q, k, v), do)

    results = bench.compare({name: functools.partial(make, name) for name in ("ours", *BASELINES)},
                            warmup=WARMUP, runs=RUNS, baselines=BASELINES)
    s = torch.finfo(DTYPE).bits // 8
    pairs = sum(n * (n + 1) // 2 for n in lengths)                        # causal (q, k) pairs
    fwd_flops, fwd_bytes = 4 * pairs * HQ * D, (2 * T * HQ * D + 2 * T * HKV * D) * s
    flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}[mode]
    nbytes = {"fwd": fwd_bytes, "bwd": 2 * fwd_bytes, "fwd+bwd": 3 * fwd_bytes}[mode]
    floor = floor_ms(nbytes, flops)
    for impl, r in results.items():
        bench.add({"case": case, "T": T, "mode": mode, "impl": impl, **r, "TFLOP/s": per_s(flops / 1e12, r),
                   "floor_frac": floor / r["median_ms"] if floor and "median_ms" in r else None})
