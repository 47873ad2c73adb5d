"""NF4 storage: dequantize (Triton) against bitsandbytes' dequantize_4bit and the PyTorch reference, at
Qwen2.5-7B projection shapes in bf16 (GB/s against the copy bandwidth: it reads 0.53 B and writes 2 B per
weight); and quantizing every linear of a Qwen2.5-7B (random bf16 weights, the real shapes) in seconds,
against bitsandbytes' quantize_4bit. On a CPU: small smoke shapes."""

import pytest
import torch
from benchutil import HAS_CUDA, floor_ms, sync, time_ms

from memcomp.fused import nf4_quantize, use_backend
from memcomp.model_configs import MODEL_CONFIGS

COLUMNS = ["what", "shape", "impl", "median_ms", "p20_ms", "p80_ms", "GB/s", "floor_frac", "total_s"]
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
SHAPES = [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)] if HAS_CUDA else [(96, 128)]


@pytest.mark.parametrize("impl", ["bitsandbytes", "reference", "ours"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_dequantize(benchmark, recorder, shape, impl):
    w = torch.randn(*shape, device=DEVICE, dtype=DTYPE)
    q = nf4_quantize(w, double_quant=True)  # byte-identical storage to bitsandbytes' (tests/kernels)
    out = torch.empty(shape, device=DEVICE, dtype=DTYPE)
    if impl == "bitsandbytes":
        bnbF = pytest.importorskip("bitsandbytes.functional")  # the baseline only: ours runs without it
        packed, state = q.to_bnb()
        fn = lambda: bnbF.dequantize_4bit(packed, state)
    else:
        backend = "triton" if impl == "ours" else "reference"

        def fn():
            with use_backend(backend):
                return q.dequantize(DTYPE, out=out)
    fn()
    sync()
    t = time_ms(fn)
    benchmark.pedantic(lambda: (fn(), sync()), rounds=3, warmup_rounds=1, iterations=1)
    n = shape[0] * shape[1]
    nbytes = n / 2 + n / 64 + n * out.element_size()
    row = {"what": "dequantize", "shape": f"{shape[0]}x{shape[1]}", "impl": impl, **t,
           "GB/s": nbytes / (t["median_ms"] * 1e-3) / 1e9,
           "floor_frac": floor_ms(nbytes, 0) / t["median_ms"] if HAS_CUDA else None}
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
    recorder.append(row)


@pytest.mark.parametrize("impl", ["bitsandbytes", "ours"])
def test_quantize_whole_model(benchmark, recorder, impl):
    """Every decoder linear of Qwen2.5-7B (28 layers x 7), random bf16 weights of the real shapes."""
    if impl == "bitsandbytes":
        bnbF = pytest.importorskip("bitsandbytes.functional")
    cfg = MODEL_CONFIGS["qwen2.5-7b"] if HAS_CUDA else MODEL_CONFIGS["tiny"]
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]
    weights = {s: torch.randn(*s, device=DEVICE, dtype=DTYPE) for s in set(shapes)}

    def quantize_all():
        for _ in range(L):
            for s in shapes:
                if impl == "ours":
                    nf4_quantize(weights[s], double_quant=True)
                else:
                    bnbF.quantize_4bit(weights[s], blocksize=64, quant_type="nf4", compress_statistics=True)
        sync()

    quantize_all()
    t = time_ms(quantize_all, warmup=0, rep=3)
    benchmark.pedantic(quantize_all, rounds=1, warmup_rounds=0, iterations=1)
    row = {"what": "quantize model", "shape": "qwen2.5-7b" if HAS_CUDA else "tiny", "impl": impl, **t,
           "total_s": t["median_ms"] / 1e3}
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
    recorder.append(row)
