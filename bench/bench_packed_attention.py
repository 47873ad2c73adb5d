"""packed_attention at Qwen2.5-7B attention shapes (Hq 28, Hkv 4, D 128), bf16, forward / backward / both:
* encoder: T = 65,536 tokens in 16-token segments;
* decoder: one row of 8,192 tokens with segment lengths drawn from 256-4,096;
ours against flash-attn varlen (when installed), FlexAttention (compiled, document block mask) and the
per-segment SDPA loop (the decoder only: 4,096 launches make the encoder loop meaningless). Reports
TFLOP/s and the fraction of the op's floor (max of bytes over bandwidth, FLOPs over the GEMM rate).
Targets (H200): encoder >= 3x flash-attn varlen and within 1.5x of its floor; decoder fwd+bwd >= 0.9x
flash-attn varlen and >= 1.2x FlexAttention. On a CPU: tiny smoke shapes."""

import random

import pytest
import torch
from benchutil import HAS_CUDA, floor_ms, sync, time_ms
from memcomp.kernels.packed_attention import flex_block_mask, packed_attention_flex

from memcomp.fused import packed_attention, use_backend

COLUMNS = ["case", "T", "mode", "impl", "median_ms", "p20_ms", "p80_ms", "TFLOP/s", "floor_frac", "speedup_vs_ours"]
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
HQ, HKV, D = (28, 4, 128) if HAS_CUDA else (4, 2, 32)
_ours: dict = {}


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


def _impl(name, cu=None, T=0):
    if name == "ours":
        def f(q, k, v, cu, m):
            with use_backend("triton"):
                return packed_attention(q, k, v, cu, m)
        return f
    if name == "flash_attn":
        pytest.importorskip("flash_attn")
        return lambda q, k, v, cu, m: packed_attention(q, k, v, cu, m, impl="flash_attn")
    if name == "flex":
        if not HAS_CUDA:
            pytest.skip("FlexAttention has no CPU backward; compiled flex needs a GPU")
        block_mask = flex_block_mask(cu, T, causal=True)  # built once, outside the timed region
        return lambda q, k, v, cu, m: packed_attention_flex(q, k, v, cu, causal=True, block_mask=block_mask)
    return lambda q, k, v, cu, m: packed_attention(q, k, v, cu, m, impl="reference")


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["ours", "flash_attn", "flex", "sdpa_loop"])
@pytest.mark.parametrize("case", ["encoder", "decoder"])
def test_packed_attention(benchmark, recorder, case, impl, mode):
    if impl == "sdpa_loop" and case == "encoder" and HAS_CUDA:
        pytest.skip("4,096 SDPA launches: not a meaningful baseline")
    lengths = _lengths(case)
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(T, h, D, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_() for h in (HQ, HKV, HKV))
    fn = _impl(impl, cu, T)
    do = torch.randn(T, HQ, D, device=DEVICE, dtype=DTYPE)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v, cu, max(lengths))
    elif mode == "bwd":
        out = fn(q, k, v, cu, max(lengths))

        def run():
            return torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    else:
        def run():
            return torch.autograd.grad(fn(q, k, v, cu, max(lengths)), (q, k, v), do)
    run()
    sync()
    t = time_ms(run)
    benchmark.pedantic(lambda: (run(), sync()), rounds=3, warmup_rounds=1, iterations=1)
    s = torch.finfo(DTYPE).bits // 8
    pairs = sum(n * (n + 1) // 2 for n in lengths)                        # causal (q, k) pairs
    fwd_flops, fwd_bytes = 4 * pairs * HQ * D, (2 * T * HQ * D + 2 * T * HKV * D) * s
    flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}[mode]
    nbytes = {"fwd": fwd_bytes, "bwd": 2 * fwd_bytes, "fwd+bwd": 3 * fwd_bytes}[mode]
    key = (case, mode)
    if impl == "ours":
        _ours[key] = t["median_ms"]
    row = {"case": case, "T": T, "mode": mode, "impl": impl, **t,
           "TFLOP/s": flops / (t["median_ms"] * 1e-3) / 1e12,
           "floor_frac": floor_ms(nbytes, flops) / t["median_ms"] if HAS_CUDA else None,
           "speedup_vs_ours": None if impl == "ours" else t["median_ms"] / _ours.get(key, float("nan"))}
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
    recorder.append(row)
