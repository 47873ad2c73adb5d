"""Scoring of long-context QA: normalisation, exact match, MemAgent's sub-string exact match, answer extraction and
Wilson intervals.

Sources:

- ``normalize_answer``: the SQuAD v1.1 evaluation script's rule (lower case, ASCII punctuation removed, the
  articles a / an / the dropped, whitespace collapsed), which MemAgent's ``taskutils/memory_eval/utils`` copies.
  It is ``memcomp.rl.rewards.normalize_answer`` itself, so the RL reward and the benchmark metric cannot drift.
- ``sub_em``: MemAgent's ``sub_exact_match_score`` (``taskutils/memory_eval/utils/__init__.py`` in
  BytedTsinghua-SIA/MemAgent): after normalisation, the gold answer is a sub-string of the prediction OR the
  prediction is a sub-string of the gold answer; RULER-HQA numbers in the MemAgent and LycheeMemory papers are
  this, averaged x 100. ``symmetric=False`` keeps only the first direction (gold in prediction: RULER's own
  ``string_match_part`` direction), which a one-word prediction cannot satisfy by being short.
- ``extract_answer``: seed 002, Appendix H: the last ``\\boxed{}`` (RL model), else the text after "Answer:"
  (SFT model), else the last 20 words.

One deliberate departure from MemAgent: a prediction that normalises to nothing (``""``, ``"The."``) scores 0.
MemAgent scores 0 only for an empty extracted string; a prediction such as ``"the"`` normalises to ``""``, which
is a sub-string of every gold answer and would score 1 there.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence

from memcomp.rl.rewards import extract_boxed, normalize_answer

__all__ = ["normalize_answer", "exact_match", "sub_em", "extract_answer", "extract_answer_with_source",
           "accuracy_interval", "LAST_WORDS"]

# Seed 002, Appendix H: "if extraction fails, we use the last 20 words".
LAST_WORDS = 20
# Two-sided 95 % normal quantile, Phi^-1(0.975).
_Z95 = 1.959963984540054

# The last "Answer:" (any case), then the rest of its line; models also write "Answer:\nParis".
_ANSWER_CUE = re.compile(r"\banswer\s*:", re.IGNORECASE)
# LaTeX text wrappers a model puts around a word answer inside \boxed{}: \boxed{\text{Paris}}. Normalisation
# would otherwise turn it into "textparis". (The same unwrapping memcomp.rl.rewards applies before its reward.)
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")


def _gold_forms(gold_answers: Sequence[str], fn: str) -> list[str]:
    """The normalised gold answers of one question, checked."""
    if isinstance(gold_answers, str):
        raise TypeError(f"{fn}: gold answers must be a list of strings, got the str {gold_answers!r}: pass "
                        f"[{gold_answers!r}]")
    if not isinstance(gold_answers, Sequence):
        raise TypeError(f"{fn}: gold answers must be a list of strings, got {type(gold_answers).__name__}")
    if len(gold_answers) == 0:
        raise ValueError(f"{fn}: a question without gold answers cannot be scored")
    out = []
    for a in gold_answers:
        if not isinstance(a, str):
            raise TypeError(f"{fn}: gold answers must be strings, got {type(a).__name__} {a!r}")
        g = normalize_answer(a)
        if not g:
            raise ValueError(f"{fn}: gold answer {a!r} is empty after normalisation (lower case, no punctuation, no "
                             "articles): as a sub-string it would match every prediction")
        out.append(g)
    return out


def _check_prediction(prediction: str, fn: str) -> str:
    if not isinstance(prediction, str):
        raise TypeError(f"{fn}: the prediction must be a str (use extract_answer on the raw response first), got "
                        f"{type(prediction).__name__}")
    return normalize_answer(prediction)


def exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 when ``normalize_answer(prediction)`` equals the normalised form of ANY gold answer, else 0.0.

    ``"The Eiffel Tower!"`` matches ``["eiffel tower"]``. Raises ``TypeError`` for a non-str prediction, and
    ``TypeError`` for bad gold answers (a bare str instead of a list, a non-str answer) and ``ValueError`` for none
    or for an answer that normalises to nothing ("The", "?")."""
    golds = _gold_forms(gold_answers, "exact_match")
    pred = _check_prediction(prediction, "exact_match")
    return float(bool(pred) and pred in golds)


def sub_em(prediction: str, gold_answers: Sequence[str], *, symmetric: bool = True) -> float:
    """MemAgent's sub-string exact match, max over the gold answers: 1.0 when, after ``normalize_answer``, a gold
    answer is a sub-string of the prediction or (``symmetric=True``, MemAgent's metric) the prediction is a
    sub-string of a gold answer; else 0.0.

    ``sub_em("It was Paris, France", ["Paris"])`` is 1.0 (gold in prediction); ``sub_em("Paris", ["Paris,
    France"])`` is 1.0 only with ``symmetric=True``. Sub-strings are of characters, as MemAgent's ``in``: gold
    ``"1"`` is inside prediction ``"1945"``. A prediction that normalises to ``""`` scores 0.0 (see the module
    docstring). Raises as ``exact_match``."""
    golds = _gold_forms(gold_answers, "sub_em")
    pred = _check_prediction(prediction, "sub_em")
    if not pred:
        return 0.0
    return float(any(g in pred or (symmetric and pred in g) for g in golds))


def extract_answer_with_source(text: str) -> tuple[str, str]:
    """``(answer, source)`` of a model response; ``source`` says which rule found it:

    - ``"boxed"``: the content of the last closed ``\\boxed{...}`` (nested braces balanced; ``\\text{}``-style
      wrappers inside it unwrapped; ``\\boxed{}`` gives ``""``);
    - ``"answer"``: else the rest of the line after the last "Answer:" (case-insensitive, spaces allowed before the
      colon), or the next non-empty line when that line is empty;
    - ``"last_words"``: else the last 20 whitespace-separated words, joined by single spaces (``""`` for a
      response without words).

    A last ``\\boxed{`` that is never closed (a response cut at the length limit) is no answer, so the later
    rules apply. Raises ``TypeError`` when ``text`` is not a str."""
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str, got {type(text).__name__}")
    boxed = extract_boxed(text)
    if boxed is not None:
        prev = None
        while prev != boxed:  # innermost first: \textbf{\text{x}}
            prev, boxed = boxed, _TEXT_WRAPPER.sub(r"\1", boxed)
        return boxed.strip(), "boxed"
    cues = list(_ANSWER_CUE.finditer(text))
    if cues:
        for line in text[cues[-1].end():].split("\n"):
            if line.strip():
                return line.strip(), "answer"
    return " ".join(text.split()[-LAST_WORDS:]), "last_words"


def extract_answer(text: str) -> str:
    """The answer in a model response: ``extract_answer_with_source(text)[0]``.

    ``"... so \\boxed{Paris}."`` -> ``"Paris"``; ``"Reasoning.\\nAnswer: Paris\\nBecause..."`` -> ``"Paris"``;
    otherwise the last 20 words. Raises ``TypeError`` when ``text`` is not a str."""
    return extract_answer_with_source(text)[0]


def accuracy_interval(hits: Sequence[float], confidence_z: float = _Z95) -> tuple[float, float, float]:
    """``(mean, low, high)`` of a list of per-question scores that are each 0 or 1 (bools, 0/1 ints or floats, as
    ``sub_em`` returns): the accuracy and its Wilson score interval (95 % by default; ``confidence_z`` is the
    normal quantile). Wilson rather than mean +- 1.96 s.e.: it stays inside [0, 1] and is honest at 0 / n and
    n / n, which small benchmark runs hit. 5 hits of 10 -> (0.5, 0.2366, 0.7634); 0 of 10 -> (0.0, 0.0,
    0.2775).

    Raises ``ValueError`` for an empty list (no accuracy exists), a score other than 0 or 1, or a non-positive
    ``confidence_z``; ``TypeError`` for a bare str or non-numeric scores."""
    if isinstance(hits, (str, bytes)) or not isinstance(hits, Sequence):
        raise TypeError(f"accuracy_interval: hits must be a sequence of 0/1 scores, got {type(hits).__name__}")
    n = len(hits)
    if n == 0:
        raise ValueError("accuracy_interval: no scores (an empty benchmark run has no accuracy)")
    if not isinstance(confidence_z, numbers.Real) or not confidence_z > 0:
        raise ValueError(f"accuracy_interval: confidence_z must be a positive number, got {confidence_z!r}")
    k = 0
    for i, h in enumerate(hits):
        if not isinstance(h, numbers.Real):
            raise TypeError(f"accuracy_interval: score {i} is a {type(h).__name__}, not a number")
        if h not in (0, 1):
            raise ValueError(f"accuracy_interval: score {i} is {h!r}; each score must be 0 or 1 (a hit or a miss)")
        k += int(h)
    p = k / n
    z2 = confidence_z * confidence_z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = confidence_z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At 0 / n (n / n) the lower (upper) bound is exactly 0 (1); floating point lands a few ulps off.
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return p, low, high
