"""Every prompt of the LycheeMemory reasoner, its gate and the baselines, in one module.

Structure (the wording is ours): MemAgent's recurrent prompts (``taskutils/memory_eval/utils/recurrent_boxed.py``
and ``recurrent/impls/memory.py`` in BytedTsinghua-SIA/MemAgent) -- each step a fresh single-turn chat holding an
instruction, ``<problem>``, the previous ``<memory>`` and the ``<section>`` to read, ending in an "Updated memory:"
cue; the final prompt holds the problem and the memory and asks for the answer in ``\\boxed{}``; the first memory
is the fixed text "No previous memory" (``NO_MEMORY``, shared with ``memcomp.eval.synthetic``, whose ideal traces
start from it). MemAgent's full-context baseline (``utils/boxed.py`` there): the text, then the question, then the
``\\boxed{}`` request.

LycheeMemory replaces the raw section by the block's memory embeddings. The decoder input of one update is::

    prefix                                   memory block                       prompt
    <|im_start|>system ... <|im_end|>        <MEM_START> m_1 <MEM_END> ...      \\n instruction, problem, memory,
    <|im_start|>user\\n                       (as the compressor wraps memory)   "Updated memory:" <|im_end|> ...

which is the ChatML layout ``memcomp.tasks.SampleBuilder(fmt="chatml")`` trains the compressor's SFT stage on
(system and user headers, memory, then a newline and the instruction), with its system prompt. The block comes
first, as in LycheeMemory's public code (compressed chunk, then the templated update prompt): everything before the
question is question-independent, so an engine with prefix caching can reuse the prefill of ``prefix + block``
across questions over the same store.

Prompts are assembled as token ids, not text: each literal piece of a template is tokenized once and the slots
(problem, memory, section) are spliced in as ids, as MemAgent's ``TokenTemplate`` does in its RL training. The
working memory is the reasoner's own generated token ids, so it is fed back exactly, never decoded and re-tokenized
(which can change ids at merges). For byte-level BPE tokenizers (Qwen2, Llama-3, SmolLM2, GPT-2)
``decode(ids)`` is exactly ``template.format(**texts)``; tokens at a slot boundary may differ from tokenizing the
whole string at once (an SFT stage that uses this module sees the same ids as inference).

The raw-text prompts (MemAgent's update, the final prompt, full context) use a plain system prompt
(``RAW_SYSTEM_PROMPT``); the final prompt is the same for LycheeMemory and MemAgent, so the answering step is not a
difference between the systems.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from memcomp.eval.synthetic import NO_MEMORY
from memcomp.tasks import SYSTEM_PROMPT

__all__ = ["NO_MEMORY", "SYSTEM_PROMPT", "RAW_SYSTEM_PROMPT", "PromptTemplate", "LYCHEE_PREFIX", "LYCHEE_UPDATE",
           "GATE_PREFIX", "GATE", "FINAL", "MEMAGENT_UPDATE", "FULL_CONTEXT", "Prompts"]

Ids = list[int]
TextOrIds = Union[str, Sequence[int], torch.Tensor]

RAW_SYSTEM_PROMPT = "You are a helpful assistant."

_TURN_END = "<|im_end|>\n<|im_start|>assistant\n"


def _chat_open(system: str) -> str:
    return "<|im_start|>system\n" + system.replace("{", "{{").replace("}", "}}") + "<|im_end|>\n<|im_start|>user\n"


@dataclass(frozen=True)
class PromptTemplate:
    """A template with ``{name}`` slots (``str.format`` syntax; literal braces doubled). ``format(**texts)`` gives
    the text; ``ids(tokenizer, **values)`` the token ids, each literal piece tokenized on its own (no special tokens
    added) and each slot value spliced in as given (a str is tokenized, token ids are kept).

    Raises ``ValueError`` for a template with positional / formatted slots, and for a missing or unknown slot
    value at render time."""

    text: str

    def __post_init__(self) -> None:
        for _, name, spec, conv in string.Formatter().parse(self.text):
            if name is not None and (not name.isidentifier() or spec or conv):
                raise ValueError(f"PromptTemplate: slot {{{name}}} must be a plain name (no format spec, conversion "
                                 "or positional slot)")

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(name for _, name, _, _ in string.Formatter().parse(self.text) if name is not None)

    def pieces(self) -> list[tuple[str, str | None]]:
        """``[(literal, slot name or None), ...]`` in order, literal braces undoubled. ``string.Formatter`` splits a
        literal at each doubled brace; the pieces are merged back, so a literal is tokenized whole."""
        out: list[tuple[str, str | None]] = []
        for lit, name, _, _ in string.Formatter().parse(self.text):
            if out and out[-1][1] is None:
                lit = out.pop()[0] + lit
            out.append((lit, name))
        return out

    def _check(self, values: dict[str, Any]) -> None:
        missing = [s for s in self.slots if s not in values]
        unknown = sorted(set(values) - set(self.slots))
        if missing or unknown:
            raise ValueError(f"PromptTemplate: slots {list(self.slots)}; missing {missing}, unknown {unknown}")

    def format(self, **texts: str) -> str:
        self._check(texts)
        return self.text.format(**texts)


# -- LycheeMemory: one update per selected block (prefix | memory block | prompt) ------------------------------

LYCHEE_PREFIX = PromptTemplate(_chat_open(SYSTEM_PROMPT))
LYCHEE_UPDATE = PromptTemplate(
    "\nThe compressed text above is one section of a long document; it may or may not help with the problem "
    "below. Read it and rewrite your notes: keep every detail of the previous memory that bears on the problem, "
    "and add what this section adds.\n\n"
    "<problem>\n{problem}\n</problem>\n\n<memory>\n{memory}\n</memory>\n\nUpdated memory:" + _TURN_END)

# -- The gate's input: [block memory][question][working memory]; its head reads the last position ---------------
# No chat header and no instruction: the gate runs on every block, so its fixed overhead is kept to the tags and the
# cue (a trained head needs no instruction to know its task); the block memory opens the row.

GATE_PREFIX = PromptTemplate("")
GATE = PromptTemplate("\n<problem>\n{problem}\n</problem>\n<memory>\n{memory}\n</memory>\nRelevant:")

# -- The final prompt (LycheeMemory and MemAgent): problem + working memory -> \boxed{} answer -----------------

FINAL = PromptTemplate(
    _chat_open(RAW_SYSTEM_PROMPT)
    + "You are given a problem and your notes on a long document. Answer the problem from the notes, and put the "
    "final answer in \\boxed{{}}.\n\n"
    "<problem>\n{problem}\n</problem>\n\n<memory>\n{memory}\n</memory>\n\nYour answer:" + _TURN_END)

# -- MemAgent: one update per raw-text chunk --------------------------------------------------------------------

MEMAGENT_UPDATE = PromptTemplate(
    _chat_open(RAW_SYSTEM_PROMPT)
    + "You are given a problem, one section of a long document that may or may not help with it, and your notes "
    "so far. Read the section and rewrite your notes: keep every detail of the previous memory that bears on the "
    "problem, and add what this section adds.\n\n"
    "<problem>\n{problem}\n</problem>\n\n<memory>\n{memory}\n</memory>\n\n<section>\n{section}\n</section>\n\n"
    "Updated memory:" + _TURN_END)

# -- Full context: the whole input, then the question -----------------------------------------------------------

FULL_CONTEXT = PromptTemplate(
    _chat_open(RAW_SYSTEM_PROMPT)
    + "Read the text below and answer the question after it.\n\n<text>\n{context}\n</text>\n\n{problem}\n\n"
    "Put the final answer in \\boxed{{}}." + _TURN_END)


class Prompts:
    """The templates above rendered as token ids with one tokenizer (literal pieces tokenized once and cached).

    Every method takes slot values as a str (tokenized here, no special tokens) or token ids (a list of ints or a
    1-D integer tensor, kept as they are) and returns ``list[int]`` ids; the LycheeMemory and gate prompts return
    ``(prefix_ids, prompt_ids)``, the two sides of the memory block. Raises ``TypeError`` for a slot value of
    another type (float or 2-D tensors included)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, Ids] = {}
        self.no_memory_ids: Ids = self._literal(NO_MEMORY)

    def _literal(self, text: str) -> Ids:
        ids = self._cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
            self._cache[text] = ids
        return ids

    def ids_of(self, value: TextOrIds, what: str = "value") -> Ids:
        """``value`` as token ids (see the class docstring)."""
        if isinstance(value, str):
            return list(self.tokenizer(value, add_special_tokens=False)["input_ids"]) if value else []
        if isinstance(value, torch.Tensor):
            if value.dim() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"{what}: token ids must be a 1-D integer tensor, got {value.dtype} of shape "
                                f"{tuple(value.shape)}")
            return [int(v) for v in value.tolist()]
        if isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise TypeError(f"{what}: expected a str or token ids, got {type(value).__name__}")

    def render(self, template: PromptTemplate, **values: TextOrIds) -> Ids:
        """``template`` with its slots filled, as token ids."""
        template._check(values)
        out: Ids = []
        for literal, name in template.pieces():
            out += self._literal(literal)
            if name is not None:
                out += self.ids_of(values[name], name)
        return out

    def lychee_update(self, problem: TextOrIds, memory: TextOrIds) -> tuple[Ids, Ids]:
        return self.render(LYCHEE_PREFIX), self.render(LYCHEE_UPDATE, problem=problem, memory=memory)

    def gate(self, problem: TextOrIds, memory: TextOrIds) -> tuple[Ids, Ids]:
        return self.render(GATE_PREFIX), self.render(GATE, problem=problem, memory=memory)

    def final(self, problem: TextOrIds, memory: TextOrIds) -> Ids:
        return self.render(FINAL, problem=problem, memory=memory)

    def memagent_update(self, problem: TextOrIds, memory: TextOrIds, section: TextOrIds) -> Ids:
        return self.render(MEMAGENT_UPDATE, problem=problem, memory=memory, section=section)

    def full_context(self, problem: TextOrIds, context: TextOrIds) -> Ids:
        return self.render(FULL_CONTEXT, problem=problem, context=context)
