"""A locally trained tokenizer and a factory of tiny random compressors: nothing is downloaded."""

import copy

import pytest
import torch
from testutil import tiny_model


@pytest.fixture
def make_compressor(base_tokenizer):
    from memcomp import CompressorConfig, MemoryCompressor

    def make(family="qwen2", seed=0, **config):
        tok = copy.deepcopy(base_tokenizer)
        model = tiny_model(tok, family=family, seed=seed)
        comp = MemoryCompressor.from_base(model, tok, CompressorConfig(**{"chunk_size": 4, **config}))
        with torch.no_grad():  # a non-trivial projection, so tests see it applied
            comp.projection.weight.add_(0.05 * torch.randn_like(comp.projection.weight))
            comp.projection.bias.normal_(0, 0.1)
        return comp

    return make


@pytest.fixture(scope="session")
def smollm2_loaded():
    """SmolLM2-135M-Instruct, loaded once per session (memcomp.models: ~1 s from the converted cache, ~30 s for the
    conversion on a machine's first use). Not a skip when missing: scripts/setup.sh installs it, and the error names
    the command."""
    from memcomp.models import load_pretrained

    return load_pretrained("smollm2-135m-instruct")


@pytest.fixture
def smollm2(smollm2_loaded):
    """A private (model, tokenizer) copy per test: tests add tokens, resize embeddings and swap modules."""
    model, tok = smollm2_loaded
    return copy.deepcopy(model), copy.deepcopy(tok)
