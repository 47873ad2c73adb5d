"""memcomp.projection: each projection_init on a small model whose embedding and final-norm scales are set by
hand, so the expected statistics are known exactly (the choice itself is measured on SmolLM2: README "Models")."""

import copy

import pytest
import torch
from testutil import tiny_model

from memcomp import CompressorConfig, MemoryCompressor
from memcomp.config import PROJECTION_INITS
from memcomp.projection import embedding_scale, init_projection


@pytest.fixture
def scaled(base_tokenizer):
    """A tiny Llama with embeddings of RMS 0.1 and a final norm weight of RMS 5: s = 0.02."""
    tok = copy.deepcopy(base_tokenizer)
    model = tiny_model(tok, family="llama", hidden=64)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(0.1 / emb.pow(2).mean().sqrt())
        model.base_model.norm.weight.fill_(5.0)
    return model, tok


def test_embedding_scale_is_the_rms_ratio(scaled):
    model, _ = scaled
    assert embedding_scale(model) == pytest.approx(0.02, rel=1e-5)
    with torch.no_grad():
        model.base_model.norm.weight.zero_()
    with pytest.raises(ValueError, match="all zeros"):
        embedding_scale(model)


@pytest.mark.parametrize("kind", PROJECTION_INITS)
def test_each_init_has_its_statistics_and_a_zero_bias(scaled, kind):
    model, _ = scaled
    d = model.config.hidden_size
    proj = torch.nn.Linear(d, d)
    torch.manual_seed(0)
    init_projection(proj, model, kind)
    w = proj.weight.detach()
    assert torch.equal(proj.bias.detach(), torch.zeros(d))
    if kind.endswith("identity"):
        torch.testing.assert_close(w, (0.02 if kind == "scaled_identity" else 1.0) * torch.eye(d))
    else:  # N(0, sigma^2 / d): the entries' std, and the norm a unit-RMS vector keeps through it
        sigma = 0.02 if kind == "scaled_normal" else 1.0
        assert float(w.std()) * d ** 0.5 == pytest.approx(sigma, rel=0.05)
        x = torch.randn(256, d)
        gain = float((x @ w.T).norm(dim=-1).mean() / x.norm(dim=-1).mean())
        assert gain == pytest.approx(sigma, rel=0.1)


def test_default_memory_is_the_pooled_output_brought_to_the_embedding_scale(scaled):
    """The default's point: the identity hands the decoder the final norm's scale (here 5 / 0.1 = 50x the input
    embeddings, less what averaging 4 weakly correlated random-model states takes off); the default shrinks that
    by s = 0.02, to the embeddings' scale up to the same averaging factor. (On SmolLM2, whose pooled states share a
    dominant direction, that factor is ~1: test_real_model checks the ratio there.)"""
    model, tok = scaled
    assert CompressorConfig().projection_init == "scaled_normal"
    text = "Compressed memory lets a language model read a long context through a few dense vectors."
    norms = {}
    for kind in ("scaled_normal", "identity"):
        torch.manual_seed(0)
        comp = MemoryCompressor.from_base(copy.deepcopy(model), copy.deepcopy(tok),
                                          CompressorConfig(chunk_size=4, projection_init=kind))
        table = float(comp.model.get_input_embeddings().weight.norm(dim=-1).mean())
        norms[kind] = float(comp.encode(text).embeddings.norm(dim=-1).mean()) / table
    assert 20 < norms["identity"] < 50, norms
    assert norms["scaled_normal"] / norms["identity"] == pytest.approx(0.02, rel=0.1), norms


def test_bad_kinds_and_shapes_are_refused(scaled):
    model, _ = scaled
    with pytest.raises(ValueError, match="unknown projection_init 'xavier'"):
        init_projection(torch.nn.Linear(64, 64), model, "xavier")
    with pytest.raises(ValueError, match="must be square"):
        init_projection(torch.nn.Linear(64, 32), model, "identity")
    with pytest.raises(ValueError, match="projection_init must be one of"):
        CompressorConfig(projection_init="lstsq")
