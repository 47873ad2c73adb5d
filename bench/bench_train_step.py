"""One CPT training step (encoder + decoder + loss + backward) of the Qwen2.5-7B configuration with FQLoRA
on one GPU, at sequence length 2,048 and 4,096 (one packed row of reconstruction / continuation samples
with their 16-token chunks): tokens/s and peak memory, with memcomp's kernels against the same step on the
reference backend (eager PyTorch kernels). Target (H200): >= 1.5x the reference tokens/s with no more peak
memory. On a CPU: the tiny config."""

import random

import pytest
import torch
from benchutil import HAS_CUDA, peak_mb, sync, time_ms

from memcomp import CompressorConfig, MemoryCompressor
from memcomp.fqlora import FQLoRAConfig, apply_fqlora
from memcomp.fused import use_backend
from memcomp.model_configs import IdTokenizer, random_model
from memcomp.packing import PackingCollator
from memcomp.tasks import Sample

COLUMNS = ["seq_len", "backend", "median_ms", "tokens_per_s", "peak_MB", "speedup"]
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
_ref: dict = {}


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


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("seq_len", [2048, 4096] if HAS_CUDA else [512])
def test_cpt_step(benchmark, recorder, compressor, seq_len, backend):
    batch = _row(compressor, seq_len).to(DEVICE)

    def step():
        with use_backend(backend):
            out = compressor.forward_packed(batch)
        out.loss.backward()
        for p in compressor.parameters():
            p.grad = None

    step()
    sync()
    t = time_ms(step, warmup=1, rep=5)
    peak = peak_mb(step)
    benchmark.pedantic(lambda: (step(), sync()), rounds=1, warmup_rounds=0, iterations=1)
    tokens = batch.n_tokens + batch.enc_input_ids.numel()
    if backend == "reference":
        _ref[seq_len] = t["median_ms"]
    row = {"seq_len": seq_len, "backend": backend, **t, "tokens_per_s": tokens / (t["median_ms"] * 1e-3),
           "peak_MB": peak, "speedup": _ref[seq_len] / t["median_ms"] if backend == "triton" and seq_len in _ref
           else None}
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
    recorder.append(row)
