"""segment_mean_proj at Qwen2.5-7B width (d = 3584, C = 16, bf16, T = 65,536 and 131,072 tokens):
ours (Triton pool + cuBLAS) against (a) eager RMSNorm -> mean -> linear and (b) torch.compile of (a);
forward, backward, both. Reports time, GB/s and the fraction of the op's floor (max of bytes over the
measured copy bandwidth and FLOPs over the measured GEMM rate). On a CPU: a tiny smoke shape.

Targets on an H200: forward within 1.25x of the byte floor and >= 1.5x eager; backward >= 1.5x eager."""

import functools

import pytest
import torch
from benchutil import DEVICE, HAS_CUDA, MODES, floor_ms, mode_callable, per_s

from memcomp.fused import segment_mean_proj, segment_mean_proj_reference, use_backend

COLUMNS = ["T", "d", "mode", "impl", "median_ms", "p20_ms", "p80_ms", "GB/s", "floor_ms", "floor_frac",
           "speedup_vs_eager"]
SHAPES = [(65536, 3584, 16), (131072, 3584, 16)] if HAS_CUDA else [(256, 64, 16)]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
WARMUP, RUNS = (5, 50) if HAS_CUDA else (1, 3)
IMPLS = ("eager", "ours", "compiled")


def _inputs(T, d, C):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(T, d, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_()
    w = (torch.randn(d, d, device=DEVICE, dtype=DTYPE, generator=g) / d**0.5).requires_grad_()
    b = torch.zeros(d, device=DEVICE, dtype=DTYPE).requires_grad_()
    nw = torch.ones(d, device=DEVICE, dtype=DTYPE).requires_grad_()
    cu = torch.arange(0, T + 1, C, device=DEVICE, dtype=torch.int32)
    return h, cu, w, b, nw


def _impl(name):
    if name == "ours":
        def f(*a):
            with use_backend("triton"):
                return segment_mean_proj(*a, check_inputs=False)
        return f
    if name == "eager":
        return segment_mean_proj_reference
    return torch.compile(segment_mean_proj_reference, dynamic=False)


def _bytes_flops(T, d, C, mode):
    s = torch.finfo(DTYPE).bits // 8
    n = T // C
    fwd_b, fwd_f = (T * d + d * d + n * d + d) * s, 2 * n * d * d
    bwd_b, bwd_f = (2 * T * d + n * d + 2 * d * d) * s, 4 * n * d * d
    return {"fwd": (fwd_b, fwd_f), "bwd": (bwd_b, bwd_f), "fwd+bwd": (fwd_b + bwd_b, fwd_f + bwd_f)}[mode]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,d,C", SHAPES, ids=[f"T{s[0]}-d{s[1]}" for s in SHAPES])
def test_segment_mean_proj(bench, T, d, C, mode):
    """One shape and mode: eager, ours and torch.compile timed here, speed-ups over eager."""
    h, cu, w, b, nw = _inputs(T, d, C)
    dout = torch.randn(T // C, d, device=DEVICE, dtype=DTYPE)

    def make(name):
        fn = _impl(name)
        return mode_callable(mode, lambda: fn(h, cu, w, b, nw), (h, w, b, nw), dout)

    results = bench.compare({name: functools.partial(make, name) for name in IMPLS}, warmup=WARMUP, runs=RUNS,
                            baselines=["eager"])
    nbytes, flops = _bytes_flops(T, d, C, mode)
    floor = floor_ms(nbytes, flops)
    for impl, r in results.items():
        bench.add({"T": T, "d": d, "mode": mode, "impl": impl, **r, "GB/s": per_s(nbytes / 1e9, r),
                   "floor_ms": floor, "floor_frac": floor / r["median_ms"] if floor else None})
