"""The context format of the document tasks, and block labels for the gate.

- ``format_documents``: MemAgent's RULER-HQA context, ``"Document {i}:\\n{document}"`` for i = 1, 2, ... joined by
  a blank line (``DOCUMENT_PROMPT`` and ``'\\n\\n'.join`` in ``taskutils/memory_data/different_docs_eval.py`` of
  BytedTsinghua-SIA/MemAgent), with the character span of every document's text, so evidence can be located
  after tokenisation. The synthetic task uses the same format, so one reasoner prompt serves both.
- ``label_blocks``: tokenise a context, cut the tokens into consecutive blocks of B tokens (the last may be
  shorter) and label each block related when it overlaps an evidence span (a supporting paragraph, the needle,
  a fact of the synthetic task). This is the gate's binary target; LycheeMemory does not publish its labels, and
  "holds any evidence character" is the label that makes recall the quantity the gate's threshold controls:
  a block that is skipped while it holds part of the evidence is a miss.

Block character spans partition the context as the block store (``memcomp.lychee.store``) partitions its source:
block k runs from its first token's start offset to the next block's (the first from 0, the last to the end), so
whitespace between two blocks belongs to the earlier one and a character split over two blocks' tokens to the
later. The labels follow the tokenizer's own segmentation and need its offsets (a Hugging Face fast tokenizer);
with the same tokenizer and B, block k here is block k of the store.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DOCUMENT_TEMPLATE", "DOCUMENT_SEPARATOR", "format_documents", "tokenize_with_offsets", "Blocks",
           "label_blocks"]

DOCUMENT_TEMPLATE = "Document {i}:\n{document}"
DOCUMENT_SEPARATOR = "\n\n"

Span = tuple[int, int]


def format_documents(documents: Sequence[str]) -> tuple[str, tuple[Span, ...]]:
    """``(context, spans)``: ``context`` is ``"Document 1:\\n<d0>\\n\\nDocument 2:\\n<d1>..."`` and ``spans[j] =
    (start, end)`` is where ``documents[j]``'s text lies in it (``context[start:end] == documents[j]``; the
    "Document i:" header is outside the span).

    Raises ``TypeError`` when ``documents`` is a bare str or holds a non-str, ``ValueError`` when it is empty."""
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        raise TypeError(f"format_documents: documents must be a sequence of str, got {type(documents).__name__}")
    if len(documents) == 0:
        raise ValueError("format_documents: no documents")
    parts: list[str] = []
    spans: list[Span] = []
    pos = 0
    for j, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise TypeError(f"format_documents: document {j} is a {type(doc).__name__}, not a str")
        head = (DOCUMENT_SEPARATOR if j else "") + DOCUMENT_TEMPLATE.format(i=j + 1, document="")
        pos += len(head)
        spans.append((pos, pos + len(doc)))
        pos += len(doc)
        parts.append(head)
        parts.append(doc)
    return "".join(parts), tuple(spans)


def tokenize_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[Span]]:
    """``(input_ids, offsets)`` of ``text`` without special tokens; ``offsets[t] = (start, end)`` is the character
    span of token t. ``tokenizer`` is called as a Hugging Face tokenizer (``tokenizer(text,
    add_special_tokens=False, return_offsets_mapping=True)``).

    Raises ``TypeError`` when the tokenizer cannot return offsets (a slow, Python tokenizer: load it with
    ``use_fast=True``) or returns something else than one id per offset."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # transformers' slow tokenizers raise this for offsets
        raise TypeError(f"the tokenizer {type(tokenizer).__name__} cannot return character offsets, which locating "
                        "evidence in tokens needs: pass a fast tokenizer (AutoTokenizer.from_pretrained(..., "
                        "use_fast=True))") from e
    ids = enc.get("input_ids") if hasattr(enc, "get") else None
    offsets = enc.get("offset_mapping") if hasattr(enc, "get") else None
    if ids is None or offsets is None:
        raise TypeError(f"the tokenizer {type(tokenizer).__name__} returned no 'input_ids' / 'offset_mapping': pass "
                        "a Hugging Face fast tokenizer")
    ids, offsets = list(ids), [(int(s), int(e)) for s, e in offsets]
    if len(ids) != len(offsets):
        raise TypeError(f"the tokenizer returned {len(ids)} ids but {len(offsets)} offsets")
    return ids, offsets


@dataclass(frozen=True)
class Blocks:
    """A tokenised context cut into blocks of ``block_size`` tokens, with gate labels.

    - ``input_ids``: the ``T`` token ids of the whole context (no special tokens).
    - ``token_spans[k] = (start, end)``: block k is ``input_ids[start:end]``; ``end - start == block_size``
      except for the last block, which holds the remaining ``T - (n - 1) * block_size`` tokens.
    - ``char_spans[k]``: block k's characters (``[start, end)``; the spans partition the context).
    - ``related[k]``: whether block k overlaps any evidence span (the gate's target).
    - ``evidence_blocks[j]``: the blocks overlapping evidence span j, in order (more than one when the evidence
      straddles a block boundary; a fact is wholly read only once all of them are).
    """

    input_ids: tuple[int, ...]
    block_size: int
    token_spans: tuple[Span, ...]
    char_spans: tuple[Span, ...]
    related: tuple[bool, ...]
    evidence_blocks: tuple[tuple[int, ...], ...]

    @property
    def num_blocks(self) -> int:
        return len(self.token_spans)

    def block_ids(self, k: int) -> tuple[int, ...]:
        """The token ids of block ``k``."""
        start, end = self.token_spans[k]
        return self.input_ids[start:end]


def _check_spans(spans: Sequence[Span], length: int, what: str) -> list[Span]:
    if isinstance(spans, str) or not isinstance(spans, Sequence):
        raise TypeError(f"{what} must be a sequence of (start, end) character spans, got {type(spans).__name__}")
    out = []
    for j, span in enumerate(spans):
        if not isinstance(span, Sequence) or len(span) != 2 or not all(
                isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in span):
            raise TypeError(f"{what}[{j}] must be a (start, end) pair of ints, got {span!r}")
        s, e = int(span[0]), int(span[1])
        if not 0 <= s < e <= length:
            raise ValueError(f"{what}[{j}] = {(s, e)} is not a non-empty span inside the context of {length} "
                             "characters")
        out.append((s, e))
    return out


def label_blocks(context: str, evidence_spans: Sequence[Span], tokenizer: Any, block_size: int) -> Blocks:
    """Tokenise ``context`` (``tokenize_with_offsets``), cut it into blocks of ``block_size`` tokens and label each
    block related when its character span overlaps one of ``evidence_spans`` (``[start, end)`` character spans
    of the context, e.g. the spans ``format_documents`` returns for the evidence documents). Overlap is strict:
    a block that only touches a span's boundary is not related.

    No evidence spans is legal (every block unrelated: a negative example). Raises ``ValueError`` for an empty
    context, a ``block_size`` < 1, or a span that is empty or outside the context; ``TypeError`` for a non-str
    context, a non-integer ``block_size``, malformed spans or a tokenizer without offsets."""
    if not isinstance(context, str):
        raise TypeError(f"label_blocks: context must be a str, got {type(context).__name__}")
    if not context:
        raise ValueError("label_blocks: the context is empty, so there are no blocks to label")
    if not isinstance(block_size, numbers.Integral) or isinstance(block_size, bool):
        raise TypeError(f"label_blocks: block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"label_blocks: block_size must be >= 1, got {block_size}")
    spans = _check_spans(evidence_spans, len(context), "evidence_spans")
    ids, offsets = tokenize_with_offsets(tokenizer, context)
    if not ids:
        raise ValueError("label_blocks: the context tokenises to no tokens")
    token_spans = [(start, min(start + block_size, len(ids))) for start in range(0, len(ids), block_size)]
    starts = [0] + [offsets[start][0] for start, _ in token_spans[1:]] + [len(context)]
    char_spans = list(zip(starts[:-1], starts[1:]))
    evidence_blocks = tuple(
        tuple(k for k, (bs, be) in enumerate(char_spans) if s < be and bs < e) for s, e in spans)
    hit = {k for blocks in evidence_blocks for k in blocks}
    return Blocks(input_ids=tuple(ids), block_size=int(block_size), token_spans=tuple(token_spans),
                  char_spans=tuple(char_spans), related=tuple(k in hit for k in range(len(token_spans))),
                  evidence_blocks=evidence_blocks)
