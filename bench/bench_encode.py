"""MemoryCompressor.encode throughput: Qwen2.5-7B shapes with random weights, 120K tokens (bf16, GPU);
tokens/s and model FLOP utilisation (matmul FLOPs over the 989 TFLOP/s bf16 dense peak, and over the
GEMM rate measured in the same run). On a CPU: the tiny config, 2K tokens. Target (H200): >= 50 % MFU."""

import pytest
import torch
from benchutil import DEVICE, HAS_CUDA, ceilings, per_s

from memcomp import CompressorConfig, MemoryCompressor
from memcomp.model_configs import IdTokenizer, flops_per_token, random_model

COLUMNS = ["model", "tokens", "chunk", "chunks_per_batch", "median_ms", "p20_ms", "p80_ms", "tokens_per_s",
           "TFLOP/s", "MFU_peak", "MFU_measured_gemm"]
PEAK_TFLOPS = 989.0  # H100/H200 dense bf16
CASES = [("qwen2.5-7b", 122_880, 16, 512)] if HAS_CUDA else [("tiny", 2048, 16, 32)]
WARMUP, RUNS = (1, 5) if HAS_CUDA else (1, 2)


@pytest.mark.parametrize("name,tokens,C,cpb", CASES)
def test_encode_throughput(bench, name, tokens, C, cpb):
    """The yardstick is the hardware (MFU against the bf16 peak and the GEMM rate measured in this run)."""
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    model = random_model(name, device=DEVICE, dtype=dtype)
    comp = MemoryCompressor.from_base(model, IdTokenizer(model.config.vocab_size),
                                      CompressorConfig(chunk_size=C, chunks_per_batch=cpb, progress=False))
    ids = torch.randint(0, model.config.vocab_size - 2, (tokens,))

    # sync_each: an encode is a latency a user waits for, so each starts on an idle device, host work included.
    (r,) = bench.compare({"ours": lambda: lambda: comp.encode(ids)}, warmup=WARMUP, runs=RUNS,
                         sync_each=True).values()
    # Token j of a chunk attends to j + 1 tokens: on average (C + 1) / 2.
    flops = tokens * flops_per_token(model.config, context=(C + 1) // 2)
    tflops = per_s(flops / 1e12, r)
    bench.add({"model": name, "tokens": tokens, "chunk": C, "chunks_per_batch": cpb, **r,
               "tokens_per_s": per_s(tokens, r), "TFLOP/s": tflops,
               "MFU_peak": tflops / PEAK_TFLOPS if HAS_CUDA else None,
               "MFU_measured_gemm": tflops / ceilings()["gemm_tflops"] if HAS_CUDA else None})
