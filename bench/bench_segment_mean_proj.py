"""segment_mean_proj at Qwen2.5-7B width (d = 3584, C = 16, bf16, T = 65,536 and 131,072 tokens):
ours (Triton pool + cuBLAS) against (a) eager RMSNorm -> mean -> linear and (b) torch.compile of (a);
forward, backward, both. Reports time, GB/s and the fraction of the op's floor (max of bytes over the
measured copy bandwidth and FLOPs over the measured GEMM rate). On a CPU: a tiny smoke shape.

Targets on an H200: forward within 1.25x of the byte floor and >= 1.5x eager; backward >= 1.5x eager."""

import pytest
import torch
from benchutil import HAS_CUDA, ceilings, floor_ms, sync, time_ms

from memcomp.fused import segment_mean_proj, segment_mean_proj_reference, use_backend

COLUMNS = ["T", "d", "mode", "impl", "median_ms", "p20_ms", "p80_ms", "GB/s", "floor_ms", "floor_frac",
           "speedup_vs_eager"]
SHAPES = [(65536, 3584, 16), (131072, 3584, 16)] if HAS_CUDA else [(256, 64, 16)]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
DEVICE = "cuda" if HAS_CUDA else "cpu"
IMPLS = ["eager", "ours", "compiled"]  # eager first: the others report speed-up over it
MODES = ["fwd", "bwd", "fwd+bwd"]
_eager_ms: dict = {}


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
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,d,C", SHAPES, ids=[f"T{s[0]}-d{s[1]}" for s in SHAPES])
def test_segment_mean_proj(benchmark, recorder, T, d, C, impl, mode):
    h, cu, w, b, nw = _inputs(T, d, C)
    fn = _impl(impl)
    dout = torch.randn(T // C, d, device=DEVICE, dtype=DTYPE)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(h, cu, w, b, nw)
    elif mode == "bwd":
        out = fn(h, cu, w, b, nw)

        def run():
            return torch.autograd.grad(out, (h, w, b, nw), dout, retain_graph=True)
    else:
        def run():
            return torch.autograd.grad(fn(h, cu, w, b, nw), (h, w, b, nw), dout)
    run()
    sync()
    t = time_ms(run)

    def timed():
        run()
        sync()

    benchmark.pedantic(timed, rounds=5 if HAS_CUDA else 2, warmup_rounds=1, iterations=1)
    nbytes, flops = _bytes_flops(T, d, C, mode)
    key = (T, d, mode)
    if impl == "eager":
        _eager_ms[key] = t["median_ms"]
    row = {"T": T, "d": d, "mode": mode, "impl": impl, **t, "GB/s": nbytes / (t["median_ms"] * 1e-3) / 1e9,
           "floor_ms": floor_ms(nbytes, flops) if HAS_CUDA else None,
           "speedup_vs_eager": _eager_ms[key] / t["median_ms"] if key in _eager_ms else None}
    row["floor_frac"] = row["floor_ms"] / t["median_ms"] if row["floor_ms"] else None
    if HAS_CUDA:
        row.update(ceilings())
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
    recorder.append(row)
