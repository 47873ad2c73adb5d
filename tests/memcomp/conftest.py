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
