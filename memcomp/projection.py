"""Where the compressor's projection starts: the initialisations ``CompressorConfig.projection_init`` names.

The memory embedding of a chunk is ``W · mean(RMSNorm(h)) + b``, read by the decoder in place of an input token
embedding. On a pretrained LM (SmolLM2-135M-Instruct, 4-token chunks of stdlib docstrings) the pooled final-norm
outputs have norm 43.6 against 2.8 for the input embeddings of the same text, so the identity projection hands the
decoder vectors ~15x out of range -- and it generates a run of newlines from them. Scale is not the cause, though:
measured (``scripts/measure_projection_init.py``, numbers in the README's "Models"), the identity scaled down to the
embeddings' norm is just as bad (held-out reconstruction loss 10.1 nats at step 0 either way, against 4.5 with no
memory at all), because the pooled vectors share one dominant direction (their mean carries ~90 % of their norm)
that lies next to the embeddings of "\n", "," and " ". Random projections, at either scale, start at 4.7-4.9 and
learn as fast as anything tried. The default, ``"scaled_normal"``, is the paper's random initialisation at the
decoder's scale:

    W ~ N(0, s² / d),   s = RMS(input embedding table) / RMS(final-norm weight),   b = 0

so ``|W m| ≈ s |m|``. The RMSNorm output is ``γ ⊙ x̂`` with ``x̂`` of unit RMS, so its norm is about ``RMS(γ) √d``
when ``x̂``'s energy is spread like ``γ``'s: 43.8 estimated from the weights against 43.6 measured on SmolLM2, and
the memory starts at norm 3.2, the embedding table's own. It needs the weights only (no forward pass at
``from_base``, which matters where a 7B / 32B model is wrapped on the host before going to its GPUs).

``"normal"`` (N(0, 1/d): the paper's, unscaled), ``"identity"`` (plain mean pooling: the untrained compressor of
earlier versions, kept for models trained from scratch such as the tiny demo) and ``"scaled_identity"`` (``s I``)
stay selectable.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def embedding_scale(model: nn.Module) -> float:
    """``s = RMS(input embeddings) / RMS(final-norm weight)`` of a Hugging Face causal LM (see the module
    docstring). Raises ``ValueError`` if the final norm's weight is all zeros (nothing to scale)."""
    emb = model.get_input_embeddings().weight.detach()
    norm = getattr(model.base_model.norm, "weight", None)
    target = emb.float().pow(2).mean().sqrt()
    source = norm.detach().float().pow(2).mean().sqrt() if norm is not None else torch.ones(())
    if float(source) == 0.0:
        raise ValueError("the final norm's weight is all zeros: the memory scale is undefined")
    return float(target / source)


def init_projection(projection: nn.Linear, model: nn.Module, kind: str) -> None:
    """Initialise ``projection`` ([d, d], in place, no grad) as ``kind`` (``CompressorConfig.projection_init``)
    for ``model``; the bias, if any, starts at zero. Raises ``ValueError`` for an unknown kind or a non-square
    projection."""
    d_out, d_in = projection.weight.shape
    if d_out != d_in:
        raise ValueError(f"the projection must be square, got [{d_out}, {d_in}]")
    with torch.no_grad():
        w = projection.weight
        if kind == "scaled_normal":
            w.normal_(0.0, embedding_scale(model) * d_in ** -0.5)
        elif kind == "normal":
            w.normal_(0.0, d_in ** -0.5)
        elif kind == "identity":
            w.copy_(torch.eye(d_in, dtype=w.dtype, device=w.device))
        elif kind == "scaled_identity":
            w.copy_(embedding_scale(model) * torch.eye(d_in, dtype=w.dtype, device=w.device))
        else:
            raise ValueError(f"unknown projection_init {kind!r}")
        if projection.bias is not None:
            projection.bias.zero_()
