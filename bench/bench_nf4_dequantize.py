"""NF4 storage: dequantize (Triton) against bitsandbytes' dequantize_4bit and the PyTorch reference, at
Qwen2.5-7B projection shapes in bf16 (GB/s against the copy bandwidth: it reads 0.53 B and writes 2 B per
weight); and quantizing every linear of a Qwen2.5-7B (random bf16 weights, the real shapes) in seconds,
against bitsandbytes' quantize_4bit. On a CPU: small smoke shapes."""

import importlib

import pytest
import torch
from benchutil import DEVICE, HAS_CUDA, Unavailable, floor_ms, per_s

from memcomp.fused import nf4_quantize, use_backend
from memcomp.model_configs import MODEL_CONFIGS

COLUMNS = ["what", "shape", "impl", "median_ms", "p20_ms", "p80_ms", "GB/s", "floor_frac", "total_s",
           "speedup_vs_bitsandbytes"]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
SHAPES = [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)] if HAS_CUDA else [(96, 128)]
WARMUP, RUNS = (5, 50) if HAS_CUDA else (1, 3)
MODEL_WARMUP, MODEL_RUNS = 1, 3  # quantizing a whole model is a one-off of seconds: each run starts on an idle device


def _bnb_functional():
    """bitsandbytes.functional, the baseline only: ours runs without it."""
    try:
        return importlib.import_module("bitsandbytes.functional")
    except ImportError as exc:
        raise Unavailable(f"bitsandbytes not importable ({exc}); pip install 'memcomp[bnb]'") from exc


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_dequantize(bench, shape):
    """One weight shape: ours (Triton), the PyTorch reference and bitsandbytes' dequantize_4bit."""
    w = torch.randn(*shape, device=DEVICE, dtype=DTYPE)
    q = nf4_quantize(w, double_quant=True)  # byte-identical storage to bitsandbytes' (tests/kernels)
    out = torch.empty(shape, device=DEVICE, dtype=DTYPE)

    def bitsandbytes():
        bnbF = _bnb_functional()
        packed, state = q.to_bnb()
        return lambda: bnbF.dequantize_4bit(packed, state)

    def ours(backend):
        def run():
            with use_backend(backend):
                return q.dequantize(DTYPE, out=out)
        return run

    results = bench.compare({"bitsandbytes": bitsandbytes, "reference": lambda: ours("reference"),
                             "ours": lambda: ours("triton")}, warmup=WARMUP, runs=RUNS, baselines=["bitsandbytes"])
    n = shape[0] * shape[1]
    nbytes = n / 2 + n / 64 + n * out.element_size()  # packed codes, absmax (nested: ~1 B per block), output
    floor = floor_ms(nbytes, 0)
    for impl, r in results.items():
        bench.add({"what": "dequantize", "shape": f"{shape[0]}x{shape[1]}", "impl": impl, **r,
                   "GB/s": per_s(nbytes / 1e9, r), "floor_frac": floor / r["median_ms"] if floor and "median_ms" in r
                   else None})


def test_quantize_whole_model(bench):
    """Every decoder linear of Qwen2.5-7B (28 layers x 7), random bf16 weights of the real shapes."""
    cfg = MODEL_CONFIGS["qwen2.5-7b"] if HAS_CUDA else MODEL_CONFIGS["tiny"]
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]
    weights = {s: torch.randn(*s, device=DEVICE, dtype=DTYPE) for s in set(shapes)}

    def quantize_all(quantize):
        def run():
            for _ in range(L):
                for s in shapes:
                    quantize(weights[s])
        return run

    def bitsandbytes():
        bnbF = _bnb_functional()
        return quantize_all(lambda w: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))

    results = bench.compare({"bitsandbytes": bitsandbytes,
                             "ours": lambda: quantize_all(lambda w: nf4_quantize(w, double_quant=True))},
                            warmup=MODEL_WARMUP, runs=MODEL_RUNS, baselines=["bitsandbytes"], sync_each=True)
    for impl, r in results.items():
        bench.add({"what": "quantize model", "shape": "qwen2.5-7b" if HAS_CUDA else "tiny", "impl": impl, **r,
                   "total_s": r["median_ms"] / 1e3 if "median_ms" in r else None})
