"""One CPT training step (encoder + decoder + loss + backward) of the Qwen2.5-7B configuration with FQLoRA
on one GPU, at sequence length 2,048 and 4,096 (one packed row of reconstruction / continuation samples
with their 16-token chunks): tokens/s and peak memory, with memcomp's kernels against the same step on the
reference backend (eager PyTorch kernels). Target (H200): >= 1.5x the reference tokens/s with no more peak
memory. On a CPU: the tiny config."""

import random

import pytest
import torch
from benchutil import DEVICE, HAS_CUDA, per_s

from memcomp import CompressorConfig, MemoryCompressor
from memcomp.fqlora import FQLoRAConfig, apply_fqlora
from memcomp.fused import use_backend
from memcomp.model_configs import IdTokenizer, random_model
from memcomp.packing import PackingCollator
from memcomp.tasks import Sample

COLUMNS = ["seq_len", "backend", "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "peak_MB",
           "speedup_vs_reference"]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
WARMUP, RUNS = (2, 10) if HAS_CUDA else (1, 2)


@pytest.fixture(scope="module")
def compressor():
    name = "qwen2.5-7b" if HAS_CUDA else "tiny"
    model = random_model(name, device=DEVICE, dtype=DTYPE)
    comp = MemoryCompressor.from_base(model, IdTokenizer(model.config.vocab_size), CompressorConfig(chunk_size=16))
    apply_fqlora(comp, FQLoRAConfig())
    comp.train()  # LoRA dropout on (the paper's 0.05), as in training
    if HAS_CUDA:
        comp.enable_activation_checkpointing()  # packed-safe replay; Hugging Face's own would leave packed mode
    return comp


def _row(comp, seq_len):
    """Reconstruction samples of 256-token documents until the decoder row is full (memory 16x)."""
    rng = random.Random(0)
    V = comp.model.config.vocab_size - 2
    coll = PackingCollator.from_compressor(comp, max_tokens=seq_len)
    samples, used = [], 0
    while True:
        doc = [rng.randrange(1, V) for _ in range(256)]
        s = Sample("reconstruction", doc, [], [rng.randrange(1, V) for _ in range(8)], doc)
        n = coll.decoder_length(s)
        if used + n > seq_len:
            break
        samples.append(s)
        used += n
    (batch,) = coll(samples)
    return batch


@pytest.mark.parametrize("seq_len", [2048, 4096] if HAS_CUDA else [512])
def test_cpt_step(bench, compressor, seq_len):
    """One packed row: the step on memcomp's kernels against the same step on the reference backend."""
    batch = _row(compressor, seq_len).to(DEVICE)

    def make(backend):
        def step():
            with use_backend(backend):
                out = compressor.forward_packed(batch)
            out.loss.backward()
            for p in compressor.parameters():
                p.grad = None
        return step

    results = bench.compare({"reference": lambda: make("reference"), "triton": lambda: make("triton")},
                            warmup=WARMUP, runs=RUNS, baselines=["reference"], peak=True)
    tokens = batch.n_tokens + batch.enc_input_ids.numel()
    for backend, r in results.items():
        bench.add({"seq_len": seq_len, "backend": backend, **r, "tokens_per_s": per_s(tokens, r)})
