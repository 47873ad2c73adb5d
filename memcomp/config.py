"""Frozen configuration of the compressor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

WRAPPERS = ("per_embedding", "per_block")
PROJECTION_INITS = ("scaled_normal", "normal", "identity", "scaled_identity")


@dataclass(frozen=True)
class CompressorConfig:
    """How text becomes memory and how the decoder reads it.

    chunk_size:        C tokens per memory embedding (16 -> 16x compression).
    wrapper:           "per_embedding": each embedding wrapped as <MEM_START> m_i <MEM_END> (the paper's
                       layout, 3 decoder positions per chunk); "per_block": one pair around the whole run
                       of embeddings (n + 2 positions).
    projection_init:   where the d x d projection starts (``memcomp.projection``): "scaled_normal" (default:
                       N(0, s^2/d) with s = RMS(input embeddings) / RMS(final-norm weight), so untrained memory
                       embeddings sit at the decoder's input-embedding scale in directions it ignores; chosen by
                       measurement on SmolLM2-135M-Instruct, see the README's "Models"), "normal" (N(0, 1/d), the
                       paper's), "identity" (plain mean pooling) or "scaled_identity" (s times the identity).
    projection_bias:   whether the d x d projection has a bias.
    chunks_per_batch:  chunks per encoder micro-batch: bounds encoder memory on long inputs.
    progress:          progress bar while encoding: None = only for inputs over 32 micro-batches.
    """

    chunk_size: int = 16
    wrapper: Literal["per_embedding", "per_block"] = "per_embedding"
    projection_init: Literal["scaled_normal", "normal", "identity", "scaled_identity"] = "scaled_normal"
    projection_bias: bool = True
    chunks_per_batch: int = 256
    progress: Optional[bool] = None
    mem_start_token: str = "<MEM_START>"
    mem_end_token: str = "<MEM_END>"

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"CompressorConfig.chunk_size must be a positive int, got {self.chunk_size!r}")
        if self.wrapper not in WRAPPERS:
            raise ValueError(f"CompressorConfig.wrapper must be one of {WRAPPERS}, got {self.wrapper!r}")
        if self.projection_init not in PROJECTION_INITS:
            raise ValueError(f"CompressorConfig.projection_init must be one of {PROJECTION_INITS}, "
                             f"got {self.projection_init!r}")
        if not isinstance(self.chunks_per_batch, int) or self.chunks_per_batch < 1:
            raise ValueError(f"CompressorConfig.chunks_per_batch must be a positive int, "
                             f"got {self.chunks_per_batch!r}")
        if not self.mem_start_token or not self.mem_end_token or self.mem_start_token == self.mem_end_token:
            raise ValueError("CompressorConfig needs two distinct, non-empty MEM start/end tokens")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CompressorConfig keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)
