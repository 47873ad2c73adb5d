"""The packing collator: many samples -> rows of at most ``max_tokens`` decoder tokens, with their chunks.

Per row (``PackedBatch``):
* encoder: all context chunks of the row's samples concatenated (``enc_input_ids [T_enc]``), positions
  from 0 in each chunk, ``enc_cu_seqlens`` one segment per chunk (a partial last chunk is a short segment);
* decoder: ``dec_input_ids [T_dec]`` with placeholders (pad id) where the memory embeddings go, in the
  configured wrapper layout; ``dec_position_ids`` from 0 in each sample; ``dec_cu_seqlens`` one segment per
  sample; ``shift_labels [T_dec]``: the token each position must predict, -100 except where the next token
  is a target (shifted within each sample, so nothing crosses a sample boundary); ``target_rows`` /
  ``target_ids``: the same, gathered on the host;
* ``memory_slots [n_chunks]``: the decoder position of each chunk's embedding, in encoder chunk order.

Rows are filled first-fit-decreasing. A sample longer than ``max_tokens`` is an error: memcomp never
truncates silently (raise ``max_tokens`` or cut documents before building samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Optional

import torch

from memcomp.tasks import Sample


@dataclass
class PackedBatch:
    enc_input_ids: torch.Tensor
    enc_position_ids: torch.Tensor
    enc_cu_seqlens: torch.Tensor
    enc_max_seqlen: int
    dec_input_ids: torch.Tensor
    dec_position_ids: torch.Tensor
    dec_cu_seqlens: torch.Tensor
    dec_max_seqlen: int
    shift_labels: torch.Tensor
    target_rows: torch.Tensor
    target_ids: torch.Tensor
    memory_slots: torch.Tensor
    sample_index: list[int]
    max_tokens: int

    @property
    def n_chunks(self) -> int:
        return self.memory_slots.numel()

    @property
    def n_tokens(self) -> int:
        return self.dec_input_ids.numel()

    @property
    def efficiency(self) -> float:
        """Decoder tokens over the row capacity."""
        return self.n_tokens / self.max_tokens

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return PackedBatch(**moved)


def _cu(lengths: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    return cu


class PackingCollator:
    """Packs ``Sample``s for one compressor layout (chunk size, wrapper, MEM token ids, pad id)."""

    def __init__(self, chunk_size: int, wrapper: str, mem_start_id: int, mem_end_id: int, pad_id: int,
                 max_tokens: int, vocab_size: Optional[int] = None) -> None:
        """``vocab_size``: when given, every token id of every sample must lie in [0, vocab_size) -- checked here,
        on the host, so that the training step needs no device-side check (``from_compressor`` passes the
        model's embedding rows)."""
        if wrapper not in ("per_embedding", "per_block"):
            raise ValueError(f"wrapper must be per_embedding or per_block, got {wrapper!r}")
        if max_tokens < 1 or chunk_size < 1:
            raise ValueError(f"max_tokens and chunk_size must be >= 1, got {max_tokens}, {chunk_size}")
        self.C, self.wrapper, self.S, self.E, self.P, self.max_tokens = (chunk_size, wrapper, mem_start_id,
                                                                         mem_end_id, pad_id, max_tokens)
        self.vocab_size = vocab_size

    @classmethod
    def from_compressor(cls, comp, max_tokens: int) -> PackingCollator:
        return cls(comp.config.chunk_size, comp.config.wrapper, comp.mem_start_id, comp.mem_end_id,
                   comp.tokenizer.pad_token_id, max_tokens, comp.model.get_input_embeddings().weight.shape[0])

    def n_chunks(self, sample: Sample) -> int:
        return -(-len(sample.context) // self.C)

    def memory_block(self, n: int) -> tuple[list[int], list[int]]:
        if n == 0:
            return [], []
        if self.wrapper == "per_embedding":
            return [self.S, self.P, self.E] * n, [3 * i + 1 for i in range(n)]
        return [self.S] + [self.P] * n + [self.E], list(range(1, n + 1))

    def decoder_length(self, sample: Sample) -> int:
        block, _ = self.memory_block(self.n_chunks(sample))
        return len(sample.before) + len(block) + len(sample.after) + len(sample.target)

    def __call__(self, samples: Sequence[Sample]) -> list[PackedBatch]:
        """Pack ``samples`` into rows; returns one ``PackedBatch`` per row."""
        lengths = []
        for i, s in enumerate(samples):
            if s.has_memory and not s.context:
                raise ValueError(f"sample {i} ({s.task}) has an empty context: only plain LM samples may have none")
            if not s.target:
                raise ValueError(f"sample {i} ({s.task}) has no target tokens")
            if self.vocab_size is not None:
                for part in ("context", "before", "after", "target"):
                    ids = getattr(s, part)
                    if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
                        raise ValueError(f"sample {i} ({s.task}): {part} token ids must lie in [0, {self.vocab_size})"
                                         f", got {min(ids)} .. {max(ids)}")
            n = self.decoder_length(s)
            if n > self.max_tokens:
                raise ValueError(f"sample {i} ({s.task}) needs {n} decoder tokens, more than max_tokens="
                                 f"{self.max_tokens}; raise max_tokens or shorten the document (no silent truncation)")
            lengths.append(n)
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(samples)), key=lambda j: -lengths[j]):  # first-fit decreasing
            for r, free in enumerate(room):
                if lengths[i] <= free:
                    rows[r].append(i)
                    room[r] -= lengths[i]
                    break
            else:
                rows.append([i])
                room.append(self.max_tokens - lengths[i])
        return [self._row([samples[i] for i in row], row) for row in rows]

    @staticmethod
    def efficiency(batches: Sequence[PackedBatch]) -> float:
        """Decoder tokens over total row capacity."""
        return sum(b.n_tokens for b in batches) / max(1, sum(b.max_tokens for b in batches))

    def _row(self, samples: list[Sample], index: list[int]) -> PackedBatch:
        enc_ids, enc_pos, chunk_lens = [], [], []
        dec_ids, dec_pos, labels, slots, sample_lens = [], [], [], [], []
        for s in samples:
            for c0 in range(0, len(s.context), self.C):
                chunk = s.context[c0:c0 + self.C]
                enc_ids += chunk
                enc_pos += range(len(chunk))
                chunk_lens.append(len(chunk))
            block, slot = self.memory_block(self.n_chunks(s))
            start = len(dec_ids)
            seq = s.before + block + s.after + s.target
            slots += [start + len(s.before) + k for k in slot]
            first_target = len(seq) - len(s.target)
            # Position p predicts token p + 1 of the same sample; only target tokens count.
            labels += [seq[p + 1] if p + 1 >= first_target else -100 for p in range(len(seq) - 1)] + [-100]
            dec_ids += seq
            dec_pos += range(len(seq))
            sample_lens.append(len(seq))
        shift = torch.tensor(labels, dtype=torch.long)
        rows = (shift != -100).nonzero().squeeze(1)
        return PackedBatch(
            enc_input_ids=torch.tensor(enc_ids, dtype=torch.long),
            enc_position_ids=torch.tensor(enc_pos, dtype=torch.long),
            enc_cu_seqlens=_cu(chunk_lens), enc_max_seqlen=max(chunk_lens, default=0),
            dec_input_ids=torch.tensor(dec_ids, dtype=torch.long),
            dec_position_ids=torch.tensor(dec_pos, dtype=torch.long),
            dec_cu_seqlens=_cu(sample_lens), dec_max_seqlen=max(sample_lens),
            shift_labels=shift, target_rows=rows, target_ids=shift[rows],
            memory_slots=torch.tensor(slots, dtype=torch.long), sample_index=list(index),
            max_tokens=self.max_tokens)
