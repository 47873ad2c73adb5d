"""The baselines LycheeMemory is measured against, in the same harness (issue 12, deliverable 4): the same engine
interface, prompts module, generation settings, answer extraction, result type and cost accounting as
``memcomp.lychee.reasoner``.

- ``MemAgent``: MemAgent's recurrent loop (BytedTsinghua-SIA/MemAgent, ``taskutils/memory_eval/utils/
  recurrent_boxed.py``) over raw-text chunks: the context is tokenized and cut into chunks of ``chunk_tokens``
  (5,000) tokens; for each chunk in order, one generation from the problem, the previous memory and the chunk's
  text (``prompts.MEMAGENT_UPDATE``) becomes the new memory (the same cap and rules as the reasoner's working
  memory); then the final prompt (``prompts.FINAL``, the same as LycheeMemory's) gives the ``\\boxed{}`` answer. No
  compression, no gate; batched across questions exactly as the reasoner is. The chunks are token ids spliced into
  the prompt (as MemAgent's RL training does), not decoded text re-tokenized (as its evaluation script does).
  MemAgent's evaluation also middle-truncates contexts beyond 120K tokens; here the whole context is read.
- ``FullContext``: the whole input in one prompt (``prompts.FULL_CONTEXT``: text, then question, then the
  ``\\boxed{}`` request, as MemAgent's full-context baseline), one generation per question, all questions in one
  engine call. Only where it fits: prompt positions plus ``answer_tokens`` must not exceed the model's window, else
  ``ValueError`` naming both numbers.

A context is a str (tokenized whole with the compressor's tokenizer), token ids (a list of ints or a 1-D integer
tensor) or a ``memcomp.lychee.store.BlockStore`` (its token stream: the blocks' tokens in order, the same tokens
LycheeMemory reads compressed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from memcomp.lychee.prompts import Prompts
from memcomp.lychee.reasoner import (
    GenerationSettings,
    ReasonerResult,
    _check_questions,
    _is_int,
    _Meter,
    _one_result_each,
    _Pick,
    _results,
    _run_loop,
    _stop_ids,
    _Walk,
    model_window,
    request_positions,
)
from memcomp.rl.engine import GenerationEngine, GenerationRequest

if TYPE_CHECKING:
    from memcomp.compressor import MemoryCompressor

__all__ = ["MemAgentConfig", "MemAgent", "FullContextConfig", "FullContext", "model_window"]


def _context_ids(compressor: MemoryCompressor, contexts: Any, n: int, who: str) -> list[torch.Tensor]:
    from memcomp.lychee.store import BlockStore

    if isinstance(contexts, (str, BlockStore)) or not isinstance(contexts, Sequence):
        raise TypeError(f"{who}: contexts must be a list with one context per question (a str, token ids or a "
                        "BlockStore)")
    if len(contexts) != n:
        raise ValueError(f"{who}: {n} questions but {len(contexts)} contexts")
    out: list[torch.Tensor] = []
    seen: dict[int, torch.Tensor] = {}
    for i, c in enumerate(contexts):
        if id(c) in seen:  # one context shared by several questions is tokenized once
            out.append(seen[id(c)])
            continue
        if isinstance(c, BlockStore):
            ids = torch.cat([c.token_ids(k) for k in range(len(c))])
        elif isinstance(c, (str, list, tuple, torch.Tensor)):
            ids = compressor.tokenize(c)
        else:
            raise TypeError(f"{who}: context {i} is a {type(c).__name__}; pass a str, token ids or a BlockStore")
        if ids.numel() == 0:
            raise ValueError(f"{who}: context {i} is empty")
        seen[id(c)] = ids
        out.append(ids)
    return out


@dataclass(frozen=True)
class MemAgentConfig:
    """``generation`` (``GenerationSettings``, the same object as the reasoner's for a fair comparison),
    ``chunk_tokens`` (raw tokens per chunk; MemAgent: 5,000), ``window`` (the model's context window in positions;
    None: ``max_position_embeddings``)."""

    generation: GenerationSettings = GenerationSettings()
    chunk_tokens: int = 5000
    window: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.generation, GenerationSettings):
            raise TypeError(f"MemAgentConfig.generation must be GenerationSettings, got "
                            f"{type(self.generation).__name__}")
        if not _is_int(self.chunk_tokens) or self.chunk_tokens < 1:
            raise ValueError(f"MemAgentConfig.chunk_tokens must be an int >= 1, got {self.chunk_tokens!r}")
        if self.window is not None and (not _is_int(self.window) or self.window < 1):
            raise ValueError(f"MemAgentConfig.window must be None or an int >= 1, got {self.window!r}")


class MemAgent:
    """MemAgent over raw-text chunks (see the module docstring): ``answer(questions, contexts)`` -> one
    ``ReasonerResult`` per question (``steps[j].block`` is chunk j; no gate scores; ``cost.gate_positions`` 0).

    Raises (before any generation) ``TypeError`` / ``ValueError`` for malformed or empty questions and contexts, a
    question longer than ``question_tokens``, and an update step that cannot fit the window: template + question +
    chunk + previous memory (``memory_tokens``) + the new memory (``memory_tokens``) > window, naming both
    numbers."""

    def __init__(self, compressor: MemoryCompressor, engine: GenerationEngine,
                 config: Optional[MemAgentConfig] = None) -> None:
        config = config if config is not None else MemAgentConfig()
        if not isinstance(config, MemAgentConfig):
            raise TypeError(f"MemAgent: config must be a MemAgentConfig, got {type(config).__name__}")
        if not isinstance(engine, GenerationEngine):
            raise TypeError(f"MemAgent: engine must be a GenerationEngine, got {type(engine).__name__}")
        self.compressor, self.engine, self.config = compressor, engine, config
        self.window = model_window(compressor, config.window)
        self.prompts = Prompts(compressor.tokenizer)

    def answer(self, questions: Sequence[str], contexts: Sequence[Any]) -> list[ReasonerResult]:
        settings, C = self.config.generation, self.config.chunk_tokens
        question_ids = _check_questions(questions, self.prompts, settings, "MemAgent.answer")
        ctx = _context_ids(self.compressor, contexts, len(questions), "MemAgent.answer")
        overhead = len(self.prompts.memagent_update([], [], []))
        for i, (q, c) in enumerate(zip(question_ids, ctx)):
            need = overhead + len(q) + min(C, c.numel()) + 2 * settings.memory_tokens
            if need > self.window:
                raise ValueError(f"MemAgent.answer: question {i}: an update step needs up to {need} positions "
                                 f"(template {overhead} + question {len(q)} + chunk {min(C, c.numel())} + memory "
                                 f"{settings.memory_tokens} + new memory {settings.memory_tokens}), more than the "
                                 f"model's window of {self.window}")
        walks = [_Walk(i, q, ids, list(self.prompts.no_memory_ids), source=c)
                 for i, (q, ids, c) in enumerate(zip(questions, question_ids, ctx))]

        def next_pick(ws: list[_Walk]) -> list[Optional[_Pick]]:
            picks: list[Optional[_Pick]] = []
            for w in ws:
                if w.cursor < math.ceil(w.source.numel() / C):
                    picks.append(_Pick(w.cursor, None))
                    w.cursor += 1
                else:
                    picks.append(None)
            return picks

        def update_request(w: _Walk, p: _Pick) -> GenerationRequest:
            chunk = w.source[p.block * C:(p.block + 1) * C]
            return GenerationRequest(None, self.prompts.memagent_update(w.question_ids, w.memory_ids, chunk))

        with _Meter(self.compressor.device) as meter:
            _run_loop(walks, compressor=self.compressor, engine=self.engine, settings=settings, prompts=self.prompts,
                      meter=meter, next_pick=next_pick, update_request=update_request)
        return _results(walks, meter)


@dataclass(frozen=True)
class FullContextConfig:
    """``generation`` (only ``answer_tokens``, ``question_tokens`` and the sampling settings apply), ``window`` (the
    model's context window in positions; None: ``max_position_embeddings``)."""

    generation: GenerationSettings = GenerationSettings()
    window: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.generation, GenerationSettings):
            raise TypeError(f"FullContextConfig.generation must be GenerationSettings, got "
                            f"{type(self.generation).__name__}")
        if self.window is not None and (not _is_int(self.window) or self.window < 1):
            raise ValueError(f"FullContextConfig.window must be None or an int >= 1, got {self.window!r}")


class FullContext:
    """The whole context in one prompt (see the module docstring): ``answer(questions, contexts)`` -> one
    ``ReasonerResult`` per question (no steps, no gate scores).

    Raises (before any generation) as ``MemAgent.answer`` for malformed input, and ``ValueError`` when a prompt plus
    ``answer_tokens`` exceeds the window, naming both numbers."""

    def __init__(self, compressor: MemoryCompressor, engine: GenerationEngine,
                 config: Optional[FullContextConfig] = None) -> None:
        config = config if config is not None else FullContextConfig()
        if not isinstance(config, FullContextConfig):
            raise TypeError(f"FullContext: config must be a FullContextConfig, got {type(config).__name__}")
        if not isinstance(engine, GenerationEngine):
            raise TypeError(f"FullContext: engine must be a GenerationEngine, got {type(engine).__name__}")
        self.compressor, self.engine, self.config = compressor, engine, config
        self.window = model_window(compressor, config.window)
        self.prompts = Prompts(compressor.tokenizer)

    def answer(self, questions: Sequence[str], contexts: Sequence[Any]) -> list[ReasonerResult]:
        settings = self.config.generation
        question_ids = _check_questions(questions, self.prompts, settings, "FullContext.answer")
        ctx = _context_ids(self.compressor, contexts, len(questions), "FullContext.answer")
        reqs = []
        for i, (q, c) in enumerate(zip(question_ids, ctx)):
            prompt = self.prompts.full_context(q, c)
            need = len(prompt) + settings.answer_tokens
            if need > self.window:
                raise ValueError(f"FullContext.answer: question {i}: the prompt is {len(prompt)} tokens and the "
                                 f"answer may take {settings.answer_tokens} more, {need} positions in all, more than "
                                 f"the model's window of {self.window}; the input does not fit (use MemAgent or "
                                 "LycheeMemory)")
            reqs.append(GenerationRequest(None, prompt))
        walks = [_Walk(i, q, ids, []) for i, (q, ids) in enumerate(zip(questions, question_ids))]
        with _Meter(self.compressor.device) as meter:
            with meter.phase("answer"):
                results = _one_result_each(self.engine, reqs, settings.options(
                    settings.answer_tokens, _stop_ids(self.compressor.tokenizer), 0))
            meter.engine_calls += 1
            now = meter.elapsed()
            for w, req, res in zip(walks, reqs, results):
                w.positions = request_positions(self.compressor, req)
                w.tokens, w.requests, w.response, w.latency = res.num_tokens, 1, res.text, now
        return _results(walks, meter)
