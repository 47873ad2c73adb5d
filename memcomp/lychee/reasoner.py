"""LycheeMemory's reasoner: gated iterative reading of compressed memory blocks with a bounded working memory
(issue 12, deliverable 3; seeds 000 / 001, whose loop follows MemAgent's).

For each question: select blocks (``gate=None``: every block; a gate in ``prefilter`` mode: the blocks whose
question-only score reaches the threshold, all scored up front in parallel batches; in ``sequential`` mode: each
block scored just before it would be read, with the current working memory), walk the selected blocks in order --
each step one generation from ``[prefix][block memory][problem + previous working memory]`` whose output is the
new working memory (``memcomp.lychee.prompts``) -- then answer from ``(problem, working memory)`` alone with the
answer in ``\\boxed{}``, extracted by ``memcomp.eval.scoring.extract_answer`` (the last ``\\boxed{}``, else the
text after "Answer:", else the last 20 words).

Batching: all questions of one ``answer`` call advance together. Each round, every question still reading gets its
next block (the sequential gate first scores, in one batch across questions, up to ``gate_lookahead`` upcoming
blocks of each with its current memory -- the memory does not change until a block is read, so scoring ahead gives
the same scores as one at a time; scores past the chosen block are discarded and counted in the gate's cost); one
engine call generates every question's update (left padding is the engine's); questions whose selected blocks are
exhausted get their final prompt, in one more engine call, and leave the batch. Every request depends only on its
own question's state, so with a deterministic engine the results equal answering one question at a time (tested
with a scripted engine). With sampling and a ``seed``, engine call i uses ``seed + i``: a run is reproducible, but
batch composition changes which call a question's step falls in.

The working memory is token ids: the update's generated tokens without the stop token, fed back into the next
prompt as they are (never decoded and re-tokenized). Its cap is ``GenerationSettings.memory_tokens`` (1,024 as in
MemAgent and LycheeMemory): the update's generation limit, so a memory that reaches it is cut there, mid-sentence
if need be (as MemAgent's is); an engine that returns more tokens than asked is cut to the first
``memory_tokens`` too. A cut is recorded in the step (``Step.truncated``). An update that generates nothing gives
an empty memory (kept, as MemAgent keeps it).

Generation runs only through a ``memcomp.rl.engine.GenerationEngine`` (``HFEngine`` now, a vLLM engine later);
the gate runs on the compressor's own model (``memcomp.lychee.gate``). Cost per question: decoder positions
prefilled by its generation requests (prefix + memory block with its MEM tokens + prompt; padding not counted),
positions read by the gate's forward passes, tokens generated, and its latency; per call (``RunCost``): wall time,
time in the gate, in memory updates and in final answers, and peak memory -- ``torch.cuda.max_memory_allocated``
on a CUDA compressor (absolute, weights included), else the growth of the process's peak resident set over the
call (Linux: the peak is reset at the start through ``/proc/self/clear_refs`` and read from ``VmHWM``; elsewhere
``getrusage``'s lifetime peak, which reads 0 when the process peaked higher before the call).
``RunCost.peak_memory_kind`` says which.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch

from memcomp.eval.scoring import extract_answer
from memcomp.lychee.prompts import Prompts
from memcomp.memory import Memory
from memcomp.rl.engine import GenerationEngine, GenerationRequest, GenerationResult, SamplingOptions

if TYPE_CHECKING:
    from memcomp.compressor import MemoryCompressor
    from memcomp.lychee.gate import Gate

__all__ = ["GenerationSettings", "ReasonerConfig", "Step", "Cost", "RunCost", "ReasonerResult", "LycheeReasoner",
           "request_positions", "model_window"]

BlockMemory = Union[Memory, torch.Tensor]
BlockSource = Any  # a memcomp.lychee.store.BlockStore or a sequence of Memory / [n, d] tensors
GateMode = Literal["prefilter", "sequential"]
CHAT_END = "<|im_end|>"


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class GenerationSettings:
    """Generation settings shared by LycheeMemory, MemAgent and full context (the same for every system compared).

    memory_tokens:    the working-memory cap and the update's generation limit (MemAgent / LycheeMemory: 1,024).
    answer_tokens:    the final answer's generation limit (MemAgent: 1,024).
    question_tokens:  the longest question accepted, in tokens (MemAgent's window budgets 1,024); longer raises.
    temperature, top_p, seed:  sampling (MemAgent's evaluation: 0.7 and 0.95; temperature 0 is greedy and then
                      top_p must be 1); see ``memcomp.rl.engine.SamplingOptions``.
    stop_token_ids:   tokens that end a generation besides the tokenizer's EOS. The prompts are ChatML, so the
                      turn end ``<|im_end|>`` is added when the tokenizer has it as one token.

    Raises ``ValueError`` / ``TypeError`` as ``SamplingOptions`` does, and for limits < 1."""

    memory_tokens: int = 1024
    answer_tokens: int = 1024
    question_tokens: int = 1024
    temperature: float = 0.7
    top_p: float = 0.95
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("memory_tokens", "answer_tokens", "question_tokens"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"GenerationSettings.{name} must be an int >= 1, got {v!r}")
        self.options(self.memory_tokens, ())  # validates temperature, top_p, seed, stop ids
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    def options(self, max_new_tokens: int, extra_stops: Sequence[int], call: int = 0) -> SamplingOptions:
        """The ``SamplingOptions`` of engine call number ``call`` (seed + call when seeded), with ``max_new_tokens``
        and ``extra_stops`` added to ``stop_token_ids``."""
        return SamplingOptions(n=1, temperature=self.temperature, top_p=self.top_p, max_new_tokens=max_new_tokens,
                               stop_token_ids=tuple(self.stop_token_ids) + tuple(extra_stops),
                               seed=None if self.seed is None else self.seed + call)


@dataclass(frozen=True)
class ReasonerConfig:
    """The reasoner's options: ``generation`` (``GenerationSettings``); with a gate, ``gate_mode`` ("prefilter" or
    "sequential"), ``gate_threshold`` (None: the gate's saved threshold for that mode), ``gate_batch_size`` (rows per
    gate forward pass) and ``gate_lookahead`` (upcoming blocks the sequential gate scores per question per batch);
    ``window``: the model's context window in positions (None: ``max_position_embeddings``)."""

    generation: GenerationSettings = GenerationSettings()
    gate_mode: GateMode = "sequential"
    gate_threshold: Optional[float] = None
    gate_batch_size: int = 64
    gate_lookahead: int = 8
    window: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.generation, GenerationSettings):
            raise TypeError(f"ReasonerConfig.generation must be GenerationSettings, got "
                            f"{type(self.generation).__name__}")
        if self.gate_mode not in ("prefilter", "sequential"):
            raise ValueError(f"ReasonerConfig.gate_mode must be 'prefilter' or 'sequential', got {self.gate_mode!r} "
                             "(to read every block without a gate, pass gate=None)")
        if self.gate_threshold is not None and (not isinstance(self.gate_threshold, numbers.Real)
                                                or isinstance(self.gate_threshold, bool)
                                                or not math.isfinite(self.gate_threshold)):
            raise ValueError(f"ReasonerConfig.gate_threshold must be None or a finite number, got "
                             f"{self.gate_threshold!r}")
        for name in ("gate_batch_size", "gate_lookahead"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"ReasonerConfig.{name} must be an int >= 1, got {v!r}")
        if self.window is not None and (not _is_int(self.window) or self.window < 1):
            raise ValueError(f"ReasonerConfig.window must be None or an int >= 1, got {self.window!r}")


@dataclass(frozen=True)
class Step:
    """One block read: ``block`` (its index in the question's block source; for MemAgent the chunk index),
    ``score`` (the gate's score that selected it; None without a gate), ``memory`` (the working memory after it,
    decoded without special tokens), ``memory_tokens`` (its length in tokens) and ``truncated`` (the update hit
    the memory cap)."""

    block: int
    score: Optional[float]
    memory: str
    memory_tokens: int
    truncated: bool


@dataclass(frozen=True)
class Cost:
    """One question's cost: ``positions_prefilled`` (decoder positions of all its generation requests: prefix,
    memory block with its MEM tokens, prompt; padding excluded), ``gate_positions`` (positions of the gate's
    forward passes for it, discarded look-ahead rows included), ``tokens_generated`` (every update and the answer,
    stop tokens included), ``latency_seconds`` (from the start of the call to its answer), ``engine_requests``."""

    positions_prefilled: int
    gate_positions: int
    tokens_generated: int
    latency_seconds: float
    engine_requests: int


@dataclass(frozen=True)
class RunCost:
    """One call's cost, shared by its questions: ``wall_seconds``; ``gate_seconds``, ``memory_seconds`` (updates),
    ``answer_seconds`` (final prompts); ``peak_memory_bytes`` and ``peak_memory_kind`` ("cuda_max_memory_allocated":
    absolute, weights included; "rss_peak_delta": growth of the process's peak RSS over the call, reset at its start;
    "rusage_peak_delta": growth of the lifetime peak RSS, 0 when the process peaked higher earlier);
    ``num_questions``, ``engine_calls``."""

    wall_seconds: float
    gate_seconds: float
    memory_seconds: float
    answer_seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str
    num_questions: int
    engine_calls: int


@dataclass(frozen=True)
class ReasonerResult:
    """One question's outcome: ``answer`` (extracted from ``response``, the final generation), ``steps`` (the
    blocks read, in order, with the working memory after each: the trace), ``gate_scores`` (every score the gate
    gave this question, by block: citations for why a block was or was not read; empty without a gate),
    ``cost`` (``Cost``) and ``run`` (the call's ``RunCost``)."""

    question: str
    answer: str
    response: str
    steps: tuple[Step, ...]
    gate_scores: dict[int, float]
    cost: Cost
    run: RunCost

    @property
    def blocks_read(self) -> tuple[int, ...]:
        return tuple(s.block for s in self.steps)

    @property
    def memories(self) -> tuple[str, ...]:
        return tuple(s.memory for s in self.steps)


def request_positions(compressor: MemoryCompressor, request: GenerationRequest) -> int:
    """Decoder positions of one request as ``build_decoder_inputs`` lays it out: prefix + memory block (MEM tokens
    included, per the compressor's wrapper) + prompt."""
    n = 0
    if isinstance(request.memory, Memory):
        n = request.memory.n_chunks
    elif isinstance(request.memory, torch.Tensor):
        n = request.memory.shape[0]
    prefix = len(compressor.tokenize(request.prefix)) if request.prefix is not None else 0
    return prefix + len(compressor.memory_layout(n)[0]) + len(compressor.tokenize(request.prompt))


def model_window(compressor: MemoryCompressor, window: Optional[int] = None) -> int:
    """``window`` if given, else the model's ``max_position_embeddings``. Raises ``ValueError`` when neither is
    known or ``window`` is not an int >= 1."""
    if window is not None:
        if not _is_int(window) or window < 1:
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
        return int(window)
    w = getattr(compressor.model.config, "max_position_embeddings", None)
    if not _is_int(w):
        raise ValueError("the model config has no max_position_embeddings; pass window=... (positions)")
    return int(w)


# ------------------------------------------------------------------------------------------------------------
# Peak memory and timing
# ------------------------------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    if m is None:
        raise OSError(f"/proc/self/status has no {field_name}")
    return int(m.group(1))


def _rusage_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class _Meter:
    """Peak memory over a call (see the module docstring) and time per phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = {"gate": 0.0, "memory": 0.0, "answer": 0.0}
        self.engine_calls = 0

    def __enter__(self) -> _Meter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_memory_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
                self.base = _status_kib("VmRSS") * 1024
                self.kind = "rss_peak_delta"
            except OSError:
                self.base = _rusage_peak_bytes()
                self.kind = "rusage_peak_delta"
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.kind == "rss_peak_delta":
            self.peak = max(0, _status_kib("VmHWM") * 1024 - self.base)
        else:
            self.peak = max(0, _rusage_peak_bytes() - self.base)
        self.wall = time.perf_counter() - self.t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t

    def run_cost(self, num_questions: int) -> RunCost:
        return RunCost(wall_seconds=self.wall, gate_seconds=self.seconds["gate"], memory_seconds=self.seconds["memory"],
                       answer_seconds=self.seconds["answer"], peak_memory_bytes=self.peak,
                       peak_memory_kind=self.kind, num_questions=num_questions, engine_calls=self.engine_calls)


# ------------------------------------------------------------------------------------------------------------
# The loop shared by LycheeMemory and MemAgent
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _Walk:
    """One question's state through the loop."""

    index: int
    question: str
    question_ids: list[int]
    memory_ids: list[int]
    steps: list[Step] = field(default_factory=list)
    scores: dict[int, float] = field(default_factory=dict)
    positions: int = 0
    gate_positions: int = 0
    tokens: int = 0
    requests: int = 0
    response: Optional[str] = None
    latency: float = 0.0
    source: Any = None  # LycheeMemory: the block source; MemAgent: the context's token ids [T]
    cursor: int = 0  # the next block / chunk to consider
    selected: Optional[list[int]] = None  # pre-filter: the blocks that passed, in order

    @property
    def done(self) -> bool:
        return self.response is not None


@dataclass(frozen=True)
class _Pick:
    block: int
    score: Optional[float]


def _stop_ids(tokenizer: Any) -> tuple[int, ...]:
    tid = tokenizer.convert_tokens_to_ids(CHAT_END)
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(tid, int) and tid >= 0 and tid != unk:
        return (tid,)
    return ()


def _check_questions(questions: Sequence[str], prompts: Prompts, settings: GenerationSettings,
                     who: str) -> list[list[int]]:
    if isinstance(questions, str) or not isinstance(questions, Sequence):
        raise TypeError(f"{who}: questions must be a list of str (one question: [question])")
    if len(questions) == 0:
        raise ValueError(f"{who}: no questions")
    out = []
    for i, q in enumerate(questions):
        if not isinstance(q, str):
            raise TypeError(f"{who}: question {i} is a {type(q).__name__}, not a str")
        ids = prompts.ids_of(q.strip())
        if not ids:
            raise ValueError(f"{who}: question {i} is empty")
        if len(ids) > settings.question_tokens:
            raise ValueError(f"{who}: question {i} is {len(ids)} tokens, longer than its budget of "
                             f"{settings.question_tokens} tokens (GenerationSettings.question_tokens)")
        out.append(ids)
    return out


def _one_result_each(engine: GenerationEngine, requests: list[GenerationRequest],
                     options: SamplingOptions) -> list[GenerationResult]:
    out = engine.generate(requests, options)
    if len(out) != len(requests) or any(len(r) != 1 for r in out):
        raise RuntimeError(f"{type(engine).__name__}.generate returned {[len(r) for r in out]} results for "
                           f"{len(requests)} requests with n=1; expected one per request")
    return [r[0] for r in out]


def _run_loop(walks: list[_Walk], *, compressor: MemoryCompressor, engine: GenerationEngine,
              settings: GenerationSettings, prompts: Prompts, meter: _Meter,
              next_pick: Callable[[list[_Walk]], list[Optional[_Pick]]],
              update_request: Callable[[_Walk, _Pick], GenerationRequest]) -> None:
    """Advance every walk block by block (see the module docstring) until all have answered."""
    tok = compressor.tokenizer
    stops = _stop_ids(tok)
    while True:
        pending = [w for w in walks if not w.done]
        if not pending:
            return
        picks = next_pick(pending)
        reading = [(w, p) for w, p in zip(pending, picks) if p is not None]
        finishing = [w for w, p in zip(pending, picks) if p is None]
        if reading:
            reqs = [update_request(w, p) for w, p in reading]
            with meter.phase("memory"):
                results = _one_result_each(engine, reqs, settings.options(settings.memory_tokens, stops,
                                                                          meter.engine_calls))
            meter.engine_calls += 1
            for (w, p), req, res in zip(reading, reqs, results):
                ids = list(res.token_ids[:-1] if res.finish_reason == "stop" else res.token_ids)
                cut = len(ids) > settings.memory_tokens
                ids = ids[: settings.memory_tokens]
                w.memory_ids = ids
                w.positions += request_positions(compressor, req)
                w.tokens += res.num_tokens
                w.requests += 1
                w.steps.append(Step(p.block, p.score, tok.decode(ids, skip_special_tokens=True), len(ids),
                                    cut or res.finish_reason == "length"))
        if finishing:
            reqs = [GenerationRequest(None, prompts.final(w.question_ids, w.memory_ids)) for w in finishing]
            with meter.phase("answer"):
                results = _one_result_each(engine, reqs, settings.options(settings.answer_tokens, stops,
                                                                          meter.engine_calls))
            meter.engine_calls += 1
            now = meter.elapsed()
            for w, req, res in zip(finishing, reqs, results):
                w.positions += request_positions(compressor, req)
                w.tokens += res.num_tokens
                w.requests += 1
                w.response = res.text
                w.latency = now


def _results(walks: list[_Walk], meter: _Meter) -> list[ReasonerResult]:
    run = meter.run_cost(len(walks))
    return [ReasonerResult(question=w.question, answer=extract_answer(w.response), response=w.response,
                           steps=tuple(w.steps), gate_scores=dict(sorted(w.scores.items())),
                           cost=Cost(w.positions, w.gate_positions, w.tokens, w.latency, w.requests), run=run)
            for w in walks]


# ------------------------------------------------------------------------------------------------------------
# LycheeMemory
# ------------------------------------------------------------------------------------------------------------


def _check_sources(compressor: MemoryCompressor, questions: Sequence[str], blocks: Any) -> list[Any]:
    from memcomp.lychee.store import BlockStore

    if isinstance(blocks, (str, BlockStore)) or not isinstance(blocks, Sequence):
        raise TypeError("LycheeReasoner.answer: blocks must be a list with one block source per question (a "
                        "BlockStore or a list of Memory / [n, d] tensors); for one store shared by all: [store] * n")
    if len(blocks) != len(questions):
        raise ValueError(f"LycheeReasoner.answer: {len(questions)} questions but {len(blocks)} block sources")
    checked: set[int] = set()
    for i, src in enumerate(blocks):
        if isinstance(src, BlockStore):
            if id(src) not in checked:
                src.check_compressor(compressor)  # MemoryMismatchError for a store of another compressor
                checked.add(id(src))
        elif isinstance(src, (str, bytes, Memory, torch.Tensor)) or not isinstance(src, Sequence):
            raise TypeError(f"LycheeReasoner.answer: the block source of question {i} is a {type(src).__name__}; "
                            "pass a BlockStore or a list of Memory / [n, d] tensors")
        else:
            for k, b in enumerate(src):
                if not isinstance(b, (Memory, torch.Tensor)):
                    raise TypeError(f"LycheeReasoner.answer: block {k} of question {i} is a {type(b).__name__}, "
                                    "not a Memory or an [n, d] tensor")
        if len(src) == 0:
            raise ValueError(f"LycheeReasoner.answer: question {i} has no blocks (empty input)")
    return list(blocks)


class LycheeReasoner:
    """The LycheeMemory loop (see the module docstring) over a compressor, a generation engine and an optional gate.

    ``LycheeReasoner(compressor, engine, gate=None, config=ReasonerConfig())``;
    ``answer(questions, blocks)`` -> one ``ReasonerResult`` per question, where ``blocks[i]`` is question i's block
    source: a ``memcomp.lychee.store.BlockStore`` (blocks read lazily from disk) or a list of ``Memory`` /
    embeddings ``[n_k, d]`` (block k). Several questions may share one source.

    Raises (before any generation): ``TypeError`` / ``ValueError`` for malformed questions or sources, an empty
    question, a question longer than ``question_tokens`` (naming both numbers), a source without blocks;
    ``MemoryMismatchError`` for a block store or a gate of another compressor (and, from the engine or the gate, for
    a ``Memory`` block of another compressor); ``ValueError`` for a gate without a threshold for the mode when
    ``gate_threshold`` is not set."""

    def __init__(self, compressor: MemoryCompressor, engine: GenerationEngine, gate: Optional[Gate] = None,
                 config: Optional[ReasonerConfig] = None) -> None:
        from memcomp.lychee.gate import Gate

        config = config if config is not None else ReasonerConfig()
        if not isinstance(config, ReasonerConfig):
            raise TypeError(f"LycheeReasoner: config must be a ReasonerConfig, got {type(config).__name__}")
        if not isinstance(engine, GenerationEngine):
            raise TypeError(f"LycheeReasoner: engine must be a GenerationEngine, got {type(engine).__name__}")
        if gate is not None:
            if not isinstance(gate, Gate):
                raise TypeError(f"LycheeReasoner: gate must be a memcomp.lychee.gate.Gate, got {type(gate).__name__}")
            gate.check_compressor(compressor)
            if config.gate_threshold is None:
                gate.threshold(config.gate_mode)  # raises for an untrained gate
        self.compressor, self.engine, self.gate, self.config = compressor, engine, gate, config
        self.window = model_window(compressor, config.window)
        self.prompts = Prompts(compressor.tokenizer)

    def _threshold(self) -> float:
        t = self.config.gate_threshold
        return t if t is not None else self.gate.threshold(self.config.gate_mode)

    def answer(self, questions: Sequence[str], blocks: Sequence[BlockSource]) -> list[ReasonerResult]:
        settings = self.config.generation
        question_ids = _check_questions(questions, self.prompts, settings, "LycheeReasoner.answer")
        sources = _check_sources(self.compressor, questions, blocks)
        if self.gate is not None:
            self.gate.check_compressor(self.compressor)
            for i, ids in enumerate(question_ids):
                self.gate.question_ids(ids, f"LycheeReasoner.answer: question {i} (for the gate)")
        self._check_window(question_ids, sources)
        walks = [_Walk(i, q, ids, list(self.prompts.no_memory_ids), source=src)
                 for i, (q, ids, src) in enumerate(zip(questions, question_ids, sources))]
        with _Meter(self.compressor.device) as meter:
            if self.gate is not None and self.config.gate_mode == "prefilter":
                with meter.phase("gate"):
                    self._prefilter(walks)
            _run_loop(walks, compressor=self.compressor, engine=self.engine, settings=settings, prompts=self.prompts,
                      meter=meter, next_pick=lambda ws: self._next(ws, meter), update_request=self._update_request)
        return _results(walks, meter)

    def _check_window(self, question_ids: list[list[int]], sources: list[Any]) -> None:
        """Every update must fit the window: prefix + largest block + template + question + previous memory + new
        memory (both ``memory_tokens``)."""
        from memcomp.lychee.store import BlockStore

        mem = self.config.generation.memory_tokens
        prefix, prompt = self.prompts.lychee_update([], [])
        overhead = len(prefix) + len(prompt)
        for i, (q, src) in enumerate(zip(question_ids, sources)):
            if isinstance(src, BlockStore):
                rows = math.ceil(src.block_tokens / src.chunk_size)
            else:
                rows = max(b.n_chunks if isinstance(b, Memory) else b.shape[0] for b in src)
            block = len(self.compressor.memory_layout(rows)[0])
            need = overhead + block + len(q) + 2 * mem
            if need > self.window:
                raise ValueError(f"LycheeReasoner.answer: question {i}: an update step needs up to {need} positions "
                                 f"(template {overhead} + block memory {block} + question {len(q)} + memory {mem} + "
                                 f"new memory {mem}), more than the model's window of {self.window}: use smaller "
                                 "blocks (BlockStoreConfig.block_tokens, memcomp ask/eval --block-tokens) or a smaller "
                                 "working-memory cap (GenerationSettings.memory_tokens, --memory-tokens)")

    def _update_request(self, w: _Walk, p: _Pick) -> GenerationRequest:
        prefix, prompt = self.prompts.lychee_update(w.question_ids, w.memory_ids)
        return GenerationRequest(w.source[p.block], prompt, prefix=prefix)

    def _gate_rows(self, rows: list[tuple[_Walk, int, Optional[list[int]]]]) -> list[float]:
        """Score (walk, block, working memory or None) rows; charge each walk its rows' positions."""
        blocks = [w.source[k] for w, k, _ in rows]
        problems = [w.question_ids for w, _, _ in rows]
        memories = [m for _, _, m in rows]
        scores = self.gate.score(blocks, problems, memories, batch_size=self.config.gate_batch_size).tolist()
        for (w, _, m), b in zip(rows, blocks):
            prefix, prompt = self.gate.prompt_ids(w.question_ids, m)
            w.gate_positions += request_positions(self.compressor, GenerationRequest(b, prompt, prefix=prefix))
        return scores

    def _prefilter(self, walks: list[_Walk]) -> None:
        t = self._threshold()
        rows = [(w, k, None) for w in walks for k in range(len(w.source))]
        for (w, k, _), s in zip(rows, self._gate_rows(rows)):
            w.scores[k] = s
        for w in walks:
            w.selected = [k for k in range(len(w.source)) if w.scores[k] >= t]

    def _next(self, walks: list[_Walk], meter: _Meter) -> list[Optional[_Pick]]:
        if self.gate is None or self.config.gate_mode == "prefilter":
            picks: list[Optional[_Pick]] = []
            for w in walks:
                order = w.selected if w.selected is not None else range(len(w.source))
                if w.cursor < len(order):
                    k = order[w.cursor]
                    picks.append(_Pick(k, w.scores.get(k)))
                    w.cursor += 1
                else:
                    picks.append(None)
            return picks
        with meter.phase("gate"):
            return self._sequential(walks)

    def _sequential(self, walks: list[_Walk]) -> list[Optional[_Pick]]:
        """Each walk's next block whose score with the current memory reaches the threshold, or None."""
        t, ahead = self._threshold(), self.config.gate_lookahead
        picks: dict[int, Optional[_Pick]] = {}
        seeking = list(walks)
        while seeking:
            rows = []
            for w in seeking:
                n = len(w.source)
                rows += [(w, k, w.memory_ids) for k in range(w.cursor, min(w.cursor + ahead, n))]
            scores = self._gate_rows(rows) if rows else []
            by_walk: dict[int, list[tuple[int, float]]] = {}
            for (w, k, _), s in zip(rows, scores):
                by_walk.setdefault(w.index, []).append((k, s))
            still = []
            for w in seeking:
                chosen = None
                for k, s in by_walk.get(w.index, []):
                    w.scores[k] = s
                    w.cursor = k + 1
                    if s >= t:
                        chosen = _Pick(k, s)
                        break  # later look-ahead scores were made with a memory this block will change
                if chosen is not None:
                    picks[w.index] = chosen
                elif w.cursor >= len(w.source):
                    picks[w.index] = None
                else:
                    still.append(w)
            seeking = still
        return [picks[w.index] for w in walks]
