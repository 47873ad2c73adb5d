"""Rule rewards for DAPO on QA (seed 002, section 3.3.3; DAPO, Yu et al. 2025, section 3.4).

- ``extract_boxed``: the content of the last ``\\boxed{...}`` in a response (nested braces balanced), which the RL
  ChatML template asks for (``memcomp.tasks.BOXED_INSTRUCTION``).
- ``normalize_answer``: lower case, ASCII punctuation removed, the articles a / an / the dropped, whitespace
  collapsed -- the SQuAD v1.1 evaluation script's rule, which MemAgent and RULER-HQA scoring use too.
- ``rule_reward``: 1.0 when the normalised boxed answer matches ANY gold answer, else 0.0; "em" is equality,
  "sub_em" is RULER's sub-span match (gold in prediction or prediction in gold).
- ``overlong_shaping``: DAPO's soft overlong punishment, added to the judged reward.

Everything here is pure Python (no torch): one call per response.
"""

from __future__ import annotations

import numbers
import re
import string
from collections.abc import Sequence
from typing import Optional

MODES = ("em", "sub_em")

# `\boxed{` or `\fbox{` (what math-answer extractors also accept), optional spaces before the brace.
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# LaTeX text wrappers that models put around a word answer inside \boxed{}: \boxed{\text{Paris}}. Without
# unwrapping them, normalisation would turn the answer into "textparis".
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def extract_boxed(text: str) -> Optional[str]:
    """The content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, stripped of surrounding spaces.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); an escaped brace (``\\{``, ``\\}``) is a literal
    character, not a delimiter. Returns None when there is no ``\\boxed{`` at all, or when the last one is never
    closed (a response truncated at the length limit has no final answer; an earlier, complete ``\\boxed{}`` is
    an intermediate step, not the answer). ``\\boxed{}`` gives ``""``. The brace-less ``\\boxed 5`` form is not
    recognised.

    Raises ``TypeError`` when ``text`` is not a str."""
    if not isinstance(text, str):
        raise TypeError(f"extract_boxed expects a str, got {type(text).__name__}")
    last = None
    for m in _BOXED.finditer(text):
        last = m
    if last is None:
        return None
    depth, i = 1, last.end()
    while i < len(text):
        c = text[i]
        if c == "\\":  # an escaped character (\{, \}, \\): never a delimiter
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[last.end():i].strip()
        i += 1
    return None


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, remove ASCII punctuation, drop the words a / an / the, collapse
    runs of whitespace to one space (leading / trailing removed). ``"The  U.S.A."`` -> ``"usa"``.

    Raises ``TypeError`` when ``text`` is not a str."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a str, got {type(text).__name__}")
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _unwrap_latex_text(answer: str) -> str:
    prev = None
    while prev != answer:  # innermost first: \textbf{\text{x}}
        prev, answer = answer, _TEXT_WRAPPER.sub(r"\1", answer)
    return answer


def validate_gold_answers(answers: Sequence[str]) -> list[str]:
    """The normalised gold answers of one QA record (``\\text{}``-style wrappers unwrapped, then
    ``normalize_answer``); the check every reward, rule or judge, runs first.

    Raises ``TypeError`` when ``answers`` is a bare str (iterating it would make every character an answer: wrap
    it in a list) or holds something other than str, and ``ValueError`` for a record without answers or with an
    answer that normalises to nothing (``""``, ``"The"``, ``"?"``): as a sub-string it would match every
    response. (So a multiple-choice letter "A" is refused too: SQuAD's rule drops it as an article; judge such
    records with the generative judge's own wording check, or map the letters to their option texts.)"""
    if isinstance(answers, str):
        raise TypeError(f"gold answers must be a list of strings, got the str {answers!r}: pass [{answers!r}]")
    if not isinstance(answers, Sequence):
        raise TypeError(f"gold answers must be a list of strings, got {type(answers).__name__}")
    if len(answers) == 0:
        raise ValueError("a QA record without gold answers cannot be rewarded: every record needs at least one "
                         "answer")
    out = []
    for a in answers:
        if not isinstance(a, str):
            raise TypeError(f"gold answers must be strings, got {type(a).__name__} {a!r}")
        n = normalize_answer(_unwrap_latex_text(a))
        if not n:
            raise ValueError(f"gold answer {a!r} is empty after normalisation (lower case, no punctuation, no "
                             "articles): as a sub-string it would match every response")
        out.append(n)
    return out


def rule_reward(response: str, gold_answers: Sequence[str], mode: str = "em") -> float:
    """Binary rule reward of one response: 1.0 if the answer in its last ``\\boxed{}`` matches ANY of
    ``gold_answers`` after ``normalize_answer``, else 0.0.

    ``mode``: "em" (normalised strings equal) or "sub_em" (one contains the other, as RULER / MemAgent score
    multi-hop QA: prediction "paris france" matches gold "paris", and prediction "1" matches gold "1945" -- the
    published metric, loose by design). ``\\text{...}``-style wrappers inside the box are unwrapped first. A
    response without a closed ``\\boxed{}``, or whose boxed answer normalises to nothing, scores 0.0: under
    sub-string matching an empty prediction would be "contained" in every gold answer (a reward hack the plain
    metric allows). The same rule as ``memcomp.eval.scoring``'s metrics, so reward and benchmark agree.

    Raises ``TypeError`` / ``ValueError`` for bad gold answers (``validate_gold_answers``: a QA record without
    answers included), ``TypeError`` for a non-str response, ``ValueError`` for an unknown mode."""
    if mode not in MODES:
        raise ValueError(f"rule_reward: mode must be one of {MODES}, got {mode!r}")
    golds = validate_gold_answers(gold_answers)
    if not isinstance(response, str):
        raise TypeError(f"rule_reward: the response must be a str, got {type(response).__name__}")
    boxed = extract_boxed(response)
    if boxed is None:
        return 0.0
    pred = normalize_answer(_unwrap_latex_text(boxed))
    if not pred:
        return 0.0
    if mode == "em":
        return float(any(pred == g for g in golds))
    return float(any(g in pred or pred in g for g in golds))


def overlong_shaping(length: int, l_max: int = 600, buffer: int = 100, factor: float = 0.5) -> float:
    """DAPO's soft overlong punishment (DAPO paper, section 3.4; scaled by ``factor`` as verl's
    ``overlong_penalty_factor``), added to the judged binary reward:

        0                                          if length <= l_max - buffer
        -(length - (l_max - buffer)) / buffer * factor   if l_max - buffer < length <= l_max
        -factor                                    if length > l_max

    With the paper's values (Table 10: l_max 600, buffer 100, factor 0.5): 0 up to 500 tokens, -0.25 at 550,
    -0.5 at 600. A response longer than ``l_max`` -- one an engine without a hard cap let run past the limit, or
    one truncated there -- gets the full ``-factor``, as in the paper's third case; the linear ramp is never
    extrapolated below ``-factor``. ``length`` counts response tokens (the stop token included, as the engine
    returns them).

    Raises ``TypeError`` for a non-integer length, ``ValueError`` for a negative length, ``l_max < 1``, a buffer
    outside ``[1, l_max]`` or a negative factor."""
    if not isinstance(length, numbers.Integral) or isinstance(length, bool):
        raise TypeError(f"overlong_shaping: length must be an int (a token count), got {type(length).__name__}")
    if length < 0:
        raise ValueError(f"overlong_shaping: length must be >= 0, got {length}")
    if l_max < 1 or not 1 <= buffer <= l_max:
        raise ValueError(f"overlong_shaping: need l_max >= 1 and 1 <= buffer <= l_max, got l_max={l_max}, "
                         f"buffer={buffer}")
    if factor < 0:
        raise ValueError(f"overlong_shaping: factor must be >= 0 (a penalty), got {factor}")
    start = l_max - buffer
    if length <= start:
        return 0.0
    if length > l_max:
        return -float(factor)
    return -(length - start) / buffer * factor
