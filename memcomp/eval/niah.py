"""Needle in a haystack (NIAH): one needle sentence placed at depths x lengths in a haystack text the user supplies.

Seed 002 (Appendix G.2) follows the official implementation (Kamradt, 2023, gkamradt/LLMTest_NeedleInAHaystack)
with its default needle "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a
sunny day" and question "What is the best thing to do in San Francisco?", inserted at varying depths in Paul
Graham essays (not shipped here: pass any text, e.g. those essays, with ``read_haystack``). The needle keeps the
final period of Kamradt's ``needle`` default (the paper quotes it without), so it is a sentence of its own.

Construction (Kamradt's ``insert_needle``, with the differences said):

- ``length`` counts the tokens of the whole context (haystack + needle) under the tokenizer the caller passes;
  the result never exceeds it. Kamradt also subtracts a 200-token buffer for the prompt and the answer; here the
  context is all there is, and the caller sizes ``length`` for its own prompt.
- The haystack is repeated (copies joined by a blank line) when it is shorter than the longest length, as
  Kamradt re-reads the essay folder until it is long enough, then cut at the last sentence end that fits, so the
  context is whole sentences (Kamradt cuts at a token, mid-sentence).
- Depth ``d`` in [0, 1] (Kamradt's percent / 100): the needle goes at the last sentence boundary at or before
  the first character of haystack token ``floor(d * H)`` (H: haystack tokens kept); ``d = 1`` puts it at the end,
  ``d = 0`` at the start. Kamradt walks back token by token to a token equal to "."; here a boundary is a ``.``,
  ``!`` or ``?`` (and any closing quotes or brackets) followed by whitespace, found on characters, so it does not
  depend on how the tokenizer splits punctuation.
- Seed 002 grades answers with an LLM judge (1-10); for a rule score the example carries the needle's claim as
  its gold answer (``DEFAULT_ANSWER``), for ``memcomp.eval.scoring.sub_em``.

Every example records where the needle is, in characters and in tokens, so the block holding it can be
labelled related (``memcomp.eval.documents.label_blocks`` with ``[example.needle_span]``).
"""

from __future__ import annotations

import bisect
import glob
import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memcomp.eval._io import PathLike
from memcomp.eval.documents import Span, tokenize_with_offsets

__all__ = ["DEFAULT_NEEDLE", "DEFAULT_QUESTION", "DEFAULT_ANSWER", "NIAHExample", "read_haystack", "build_niah"]

DEFAULT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"

# End of a sentence: . ! or ? (then any closing quotes / brackets), followed by whitespace or the end of the text.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s|$)")
_HAYSTACK_JOIN = "\n\n"


@dataclass(frozen=True)
class NIAHExample:
    """One NIAH context.

    - ``context``: whole haystack sentences with ``needle`` inserted between two of them (or first / last).
    - ``length`` / ``depth``: as requested; ``num_tokens`` (<= ``length``): the context's tokens under the
      tokenizer used to build it (no special tokens).
    - ``needle_span``: ``(start, end)`` characters, ``context[start:end] == needle``; ``needle_tokens``: the
      ``[first, last + 1)`` token range that overlaps it.
    - ``question`` and ``answers`` (gold strings for ``sub_em``).
    """

    context: str
    question: str
    needle: str
    answers: tuple[str, ...]
    length: int
    depth: float
    num_tokens: int
    needle_span: Span
    needle_tokens: Span


def read_haystack(path: PathLike) -> str:
    """The haystack text of a file, or of every ``*.txt`` file of a folder (sorted by name, joined by a blank
    line, as Kamradt's tester reads its folder of essays). Raises ``FileNotFoundError`` for a missing path or a
    folder without ``.txt`` files and ``ValueError`` when the text is empty."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.txt")))
        if not files:
            raise FileNotFoundError(f"read_haystack: no .txt files in the folder {path}")
    elif os.path.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"read_haystack: {path} does not exist")
    texts = []
    for name in files:
        with open(name, encoding="utf-8") as f:
            texts.append(f.read())
    text = _HAYSTACK_JOIN.join(texts)
    if not text.strip():
        raise ValueError(f"read_haystack: {path} holds no text")
    return text


def _check_str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"build_niah: {name} must be a non-empty string, got {value!r}")
    return value


def _insert(hay: str, pos: int, needle: str) -> tuple[str, int]:
    """``hay`` with ``needle`` at the sentence boundary ``pos``, separated by one space; and the needle's start."""
    if pos == 0:
        return f"{needle} {hay}", 0
    # hay[pos:] starts with the whitespace that followed the sentence end (or is empty at the end of the text).
    return f"{hay[:pos]} {needle}{hay[pos:]}", pos + 1


def build_niah(haystack: str, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float], *,
               needle: str = DEFAULT_NEEDLE, question: str = DEFAULT_QUESTION,
               answers: Sequence[str] = (DEFAULT_ANSWER,)) -> list[NIAHExample]:
    """NIAH contexts for every ``(length, depth)``, lengths outer (Kamradt's loop order): ``len(lengths) *
    len(depths)`` examples. ``haystack`` is the text (``read_haystack(path)`` for a file or a folder);
    ``tokenizer`` is a Hugging Face fast tokenizer (it measures lengths, and its offsets map tokens to
    characters); ``lengths`` are token counts, ``depths`` fractions in [0, 1]. See the module docstring for the
    construction.

    Raises ``ValueError`` for an empty haystack or one without any sentence end, a length too small to hold the
    needle and one haystack sentence, a depth outside [0, 1], empty ``lengths`` / ``depths``, or an empty needle,
    question or answer; ``TypeError`` for non-integer lengths, non-numeric depths or a tokenizer without offsets."""
    if not isinstance(haystack, str) or not haystack.strip():
        raise ValueError("build_niah: the haystack is empty (pass its text; read_haystack(path) reads a file)")
    needle, question = _check_str(needle, "needle"), _check_str(question, "question")
    if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers:
        raise ValueError(f"build_niah: answers must be a non-empty list of strings, got {answers!r}")
    answers = tuple(_check_str(a, "an answer") for a in answers)
    for name, values in (("lengths", lengths), ("depths", depths)):
        if isinstance(values, str) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"build_niah: {name} must be a non-empty sequence, got {values!r}")
    for n in lengths:
        if not isinstance(n, numbers.Integral) or isinstance(n, bool):
            raise TypeError(f"build_niah: lengths must be ints (token counts), got {n!r}")
    for d in depths:
        if not isinstance(d, numbers.Real) or isinstance(d, bool):
            raise TypeError(f"build_niah: depths must be numbers in [0, 1], got {d!r}")
        if not 0.0 <= float(d) <= 1.0:
            raise ValueError(f"build_niah: depth {d} is outside [0, 1] (a fraction of the context, not a percent)")
    if _SENTENCE_END.search(haystack) is None:
        raise ValueError("build_niah: the haystack has no sentence end (. ! or ? before whitespace), so there is "
                         "no boundary to insert the needle at")

    needle_tokens = len(tokenize_with_offsets(tokenizer, " " + needle)[0])
    # Enough copies that the longest context fits; the repeated text is tokenised once.
    _, offsets = tokenize_with_offsets(tokenizer, haystack)
    text = haystack
    if len(offsets) < max(lengths):
        text = _HAYSTACK_JOIN.join([haystack] * (math.ceil(max(lengths) / max(len(offsets), 1)) + 1))
        _, offsets = tokenize_with_offsets(tokenizer, text)
    ends = [e for _, e in offsets]
    boundaries = [0] + [m.end() for m in _SENTENCE_END.finditer(text)]

    examples = []
    for length in lengths:
        budget = int(length) - needle_tokens
        while True:
            # Whole sentences that fit in `budget` haystack tokens.
            last_char = ends[min(budget, len(ends)) - 1] if budget > 0 else 0
            cut = boundaries[bisect.bisect_right(boundaries, last_char) - 1]
            if cut == 0:
                raise ValueError(f"build_niah: length {length} is too small: the needle alone takes {needle_tokens} "
                                 "tokens and no whole haystack sentence fits beside it")
            hay = text[:cut]
            n_hay = bisect.bisect_right(ends, cut)  # haystack tokens kept (in the long text's tokenisation)
            contexts = []
            for depth in depths:
                t = math.floor(float(depth) * n_hay)
                target = offsets[t][0] if t < n_hay else cut
                pos = boundaries[bisect.bisect_right(boundaries, target) - 1]
                contexts.append((float(depth), *_insert(hay, pos, needle)))
            measured = [tokenize_with_offsets(tokenizer, c)[1] for _, c, _ in contexts]
            over = max(len(offs) for offs in measured) - int(length)
            if over <= 0:
                break
            budget -= over  # merges at the joins made it longer than measured: drop sentences and retry
        for (depth, context, start), offs in zip(contexts, measured):
            span = (start, start + len(needle))
            hit = [k for k, (s, e) in enumerate(offs) if s < span[1] and span[0] < e]
            examples.append(NIAHExample(context=context, question=question, needle=needle, answers=answers,
                                        length=int(length), depth=depth, num_tokens=len(offs), needle_span=span,
                                        needle_tokens=(hit[0], hit[-1] + 1)))
    return examples
