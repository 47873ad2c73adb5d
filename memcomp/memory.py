"""Memory: the compressed form of one text, computed once and reused across questions."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

FORMAT = "memcomp-memory"
FORMAT_VERSION = "1"


class MemoryMismatchError(ValueError):
    """A memory used with a compressor other than the one that made it."""


class MemoryFileError(ValueError):
    """A memory file that is missing, truncated, corrupt or not a memcomp memory."""


@dataclass
class Memory:
    """``embeddings [n_chunks, d]`` for a text of ``num_tokens`` tokens cut into ``chunk_size`` chunks.

    ``fingerprint`` identifies the compressor that made it (``MemoryCompressor.fingerprint``: the chunk size, the
    model's architecture fields and the exact contents of every tensor the encoder reads -- embeddings, decoder
    layers, final norm, projection). ``MemoryCompressor.check_memory`` raises ``MemoryMismatchError`` when any of
    them differs, so a memory is never read by a compressor whose weights changed after it was encoded.
    """

    embeddings: torch.Tensor
    num_tokens: int
    chunk_size: int
    fingerprint: str

    def __post_init__(self) -> None:
        if not isinstance(self.embeddings, torch.Tensor) or self.embeddings.dim() != 2:
            shape = tuple(getattr(self.embeddings, "shape", ()))
            raise ValueError(f"Memory.embeddings must be a [n_chunks, d] tensor, got {shape or type(self.embeddings)}")
        if not self.embeddings.is_floating_point():
            raise TypeError(f"Memory.embeddings must be floating point (the decoder's input embeddings), got "
                            f"{self.embeddings.dtype}")
        if self.chunk_size < 1 or self.num_tokens < 0:
            raise ValueError(f"Memory needs chunk_size >= 1 and num_tokens >= 0, got {self.chunk_size}, "
                             f"{self.num_tokens}")
        expected = math.ceil(self.num_tokens / self.chunk_size)
        if self.embeddings.shape[0] != expected:
            raise ValueError(f"Memory of {self.num_tokens} tokens in chunks of {self.chunk_size} needs "
                             f"{expected} embeddings, got {self.embeddings.shape[0]}")

    def __repr__(self) -> str:
        e = self.embeddings
        return (f"Memory(embeddings=[{e.shape[0]}, {e.shape[1]}] {str(e.dtype).removeprefix('torch.')} on {e.device}, "
                f"num_tokens={self.num_tokens}, chunk_size={self.chunk_size}, fingerprint={self.fingerprint!r})")

    @property
    def n_chunks(self) -> int:
        return self.embeddings.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embeddings.shape[1]

    def to(self, *args, **kwargs) -> Memory:
        return Memory(self.embeddings.to(*args, **kwargs), self.num_tokens, self.chunk_size, self.fingerprint)

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (written to a temporary name, then renamed: never half-written)."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "num_tokens": str(self.num_tokens),
                "chunk_size": str(self.chunk_size), "fingerprint": self.fingerprint}
        save_file({"embeddings": self.embeddings.detach().contiguous().cpu()}, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Memory:
        """Read a memory written by ``save``. Raises ``MemoryFileError`` for a missing, truncated, corrupt or
        foreign file, ``RuntimeError`` when the file is fine but ``device`` cannot take it (e.g. "cuda" without
        CUDA)."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MemoryFileError(f"memory file not found: {path}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                if meta.get("format") != FORMAT or "embeddings" not in keys:
                    raise MemoryFileError(f"{path} is a safetensors file but not a memcomp memory "
                                          f"(metadata format={meta.get('format')!r}, tensors={keys})")
                if meta.get("format_version") != FORMAT_VERSION:
                    raise MemoryFileError(f"{path}: memory format_version {meta.get('format_version')!r}, this "
                                          f"memcomp reads {FORMAT_VERSION}")
                emb = f.get_tensor("embeddings")
            memory = cls(emb, int(meta["num_tokens"]), int(meta["chunk_size"]), meta["fingerprint"])
        except MemoryFileError:
            raise
        except Exception as exc:  # safetensors raises several types on truncated/corrupt headers
            raise MemoryFileError(f"cannot read memory file {path}: it is truncated or corrupt ({exc})") from exc
        try:  # the file is fine from here on: a device error is not a file error
            return memory.to(device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise RuntimeError(f"read memory file {path}, but cannot place it on device {device!r}: {exc}") from exc
