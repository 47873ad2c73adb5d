"""LycheeMemory's evaluation harness and its user entry point (issue 12, deliverables 5 and 6).

``run_eval`` runs one or more systems on the same questions, at the same lengths, with the same
``GenerationSettings``, and reports per system and length what the issue asks for:

- ``lychee``: LycheeMemory with its gate (``LycheeReasoner`` over a ``BlockStore`` of the context; the gate's saved
  threshold for ``gate_mode``);
- ``lychee-nogate``: the same reasoner reading every block (the gate's contribution is the difference);
- ``memagent``: MemAgent over raw-text chunks of ``chunk_tokens`` tokens (``memcomp.lychee.baselines``);
- ``full``: the whole context in one prompt, at the lengths where every question fits the model's window (at the
  others the row says why it was skipped, with both numbers).

Tasks (``load_items``): the synthetic multi-hop task (``memcomp.eval.synthetic``; lengths in tokens, distractor
paragraphs from the stdlib's docstrings or a user's text file), RULER-HQA from a user's HotpotQA dev-distractor JSON
(``memcomp.eval.ruler_hqa``; lengths are numbers of documents, MemAgent's N) and NIAH from a user's haystack file or
folder (``memcomp.eval.niah``; lengths in tokens, one question per depth).

Per (system, length) row: accuracy (MemAgent's ``sub_em`` on the extracted answer) with its 95 % Wilson interval,
wall time per question (the systems' calls divided by the questions: batched calls share their time), mean
latency, peak memory (the largest over the calls; its kind as ``memcomp.lychee.reasoner.RunCost`` defines it),
positions prefilled, gate positions, tokens generated, blocks read of blocks available, time in the gate, in
memory updates and in final answers; for the LycheeMemory rows also the seconds spent building the block stores
(question-independent, paid once per input and reused by every later question, so reported apart from the
per-question time). ``write_report`` writes JSON (rows, every question's prediction and blocks read, the
configuration, machine and versions from ``memcomp.runinfo.run_metadata``), a Markdown table and, when matplotlib is
installed, a PNG of accuracy and time per question against length.

``ask`` answers one question about one input file with LycheeMemory, building the input's block store once: the
store goes to ``store_directory(input, compressor, block_tokens)``, keyed by the input's absolute path, the
compressor's fingerprint and the block size, so a second question on the same input with the same compressor opens
the store instead of re-encoding it (the input is re-read and hashed; a changed input is re-encoded).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from memcomp.eval.scoring import accuracy_interval, sub_em
from memcomp.lychee.prompts import Prompts
from memcomp.lychee.reasoner import GenerationSettings, ReasonerResult, model_window
from memcomp.rl.engine import GenerationEngine, GenerationRequest, GenerationResult, SamplingOptions

if TYPE_CHECKING:
    from memcomp.compressor import MemoryCompressor
    from memcomp.lychee.gate import Gate
    from memcomp.lychee.store import BlockStore

__all__ = ["SYSTEMS", "TASKS", "EvalItem", "HarnessConfig", "load_items", "run_eval", "format_table", "write_report",
           "ratios", "store_directory", "open_or_build_store", "ask", "STORE_CACHE_ENV"]

SYSTEMS = ("lychee", "lychee-nogate", "memagent", "full")
TASKS = ("synthetic", "ruler-hqa", "niah")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
STORE_CACHE_ENV = "MEMCOMP_STORE_CACHE"
_EXCERPT_CHARS = 160


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------------------------
# Questions
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalItem:
    """One question at one length: ``id`` (unique within a run), ``question``, gold ``answers``, ``context`` (the
    whole input text) and ``length`` (the task's length unit: tokens for synthetic and NIAH, documents for
    RULER-HQA)."""

    id: str
    question: str
    answers: tuple[str, ...]
    context: str
    length: int

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"EvalItem {self.id!r}: empty question")
        if not isinstance(self.context, str) or not self.context.strip():
            raise ValueError(f"EvalItem {self.id!r}: empty context")
        if isinstance(self.answers, str) or not self.answers or not all(isinstance(a, str) for a in self.answers):
            raise ValueError(f"EvalItem {self.id!r}: answers must be a non-empty list of str, got {self.answers!r}")
        if not _is_int(self.length) or self.length < 1:
            raise ValueError(f"EvalItem {self.id!r}: length must be an int >= 1, got {self.length!r}")
        object.__setattr__(self, "answers", tuple(self.answers))


def _text_paragraphs(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        paragraphs = [" ".join(p.split()) for p in f.read().split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise ValueError(f"{path} holds no text to draw distractor paragraphs from")
    return paragraphs


def load_items(task: str, tokenizer: Any, lengths: Sequence[int], *, data: Optional[str] = None,
               num_questions: int = 8, depths: Sequence[float] = DEFAULT_DEPTHS, hops: int = 2,
               seed: int = 0) -> list[EvalItem]:
    """The questions of ``task`` at every length, lengths outer.

    - ``"synthetic"``: ``num_questions`` examples per length (``generate_dataset`` with ``target_tokens=length``
      and ``hops``; the same seed at every length, so the same invented facts are hidden in more text as the length
      grows); distractors from ``data`` (a text file, paragraphs separated by blank lines) or, without it, the
      Python standard library's docstrings (``memcomp.demo.corpus.stdlib_passages``, held-out split).
    - ``"ruler-hqa"``: ``data`` is the HotpotQA dev-distractor JSON; the first ``num_questions`` questions of the
      file at N = length documents (``build_ruler_hqa``, MemAgent's seeds).
    - ``"niah"``: ``data`` is the haystack file or folder; one question per depth at each length in tokens
      (``num_questions`` does not apply).

    Raises ``ValueError`` for an unknown task, a missing ``data`` where the task needs it, empty or non-positive
    lengths, ``num_questions`` < 1, and whatever the task's builder raises (``HotpotQAFormatError`` naming the
    record and field of a malformed HotpotQA file; ``FileNotFoundError`` for a missing file)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
        raise ValueError(f"lengths must be a non-empty list of ints, got {lengths!r}")
    for n in lengths:
        if not _is_int(n) or n < 1:
            raise ValueError(f"lengths must be ints >= 1, got {n!r}")
    if not _is_int(num_questions) or num_questions < 1:
        raise ValueError(f"num_questions must be an int >= 1, got {num_questions!r}")
    if task in ("ruler-hqa", "niah") and data is None:
        what = "a HotpotQA dev-distractor JSON file" if task == "ruler-hqa" else "a haystack text file or folder"
        raise ValueError(f"task {task} needs its data: pass {what} (--data FILE); nothing is downloaded")
    items: list[EvalItem] = []
    if task == "synthetic":
        from memcomp.eval.synthetic import SyntheticConfig, generate_dataset

        if data is not None:
            distractors = _text_paragraphs(data)
        else:
            from memcomp.demo.corpus import stdlib_passages

            distractors = stdlib_passages()["heldout"]
        for n in lengths:
            cfg = SyntheticConfig(hops=hops, num_distractors=0, target_tokens=int(n))
            for j, ex in enumerate(generate_dataset(distractors, num_questions, cfg, seed=seed, tokenizer=tokenizer)):
                items.append(EvalItem(f"synthetic-{n}-{j}", ex.question, (ex.answer,), ex.context, int(n)))
    elif task == "ruler-hqa":
        from memcomp.eval.ruler_hqa import build_ruler_hqa, load_hotpotqa

        hotpot = load_hotpotqa(data)
        indices = list(range(min(num_questions, len(hotpot.questions))))
        for n in lengths:
            for rec in build_ruler_hqa(hotpot, int(n), indices=indices):
                items.append(EvalItem(f"hqa-{n}-{rec.index}", rec.question, rec.answers, rec.context, int(n)))
    else:
        from memcomp.eval.niah import build_niah, read_haystack

        for ex in build_niah(read_haystack(data), tokenizer, [int(n) for n in lengths], list(depths)):
            items.append(EvalItem(f"niah-{ex.length}-{ex.depth:g}", ex.question, ex.answers, ex.context, ex.length))
    return items


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HarnessConfig:
    """What ``run_eval`` runs.

    systems:      a subset of ``SYSTEMS``, in report order.
    generation:   the ``GenerationSettings`` every system uses (one object: the same limits and sampling).
    block_tokens: LycheeMemory's block size B (paper: 4,096), a multiple of the compressor's chunk size.
    chunk_tokens: MemAgent's raw chunk size (MemAgent: 5,000).
    gate_mode:    "sequential" (reads the working memory) or "prefilter" (question only) for ``lychee``.
    batch_size:   questions per system call (left-padded together by the engine); 1 gives per-question latency
                  and peak memory of one question at a time.
    window:       the model's context window in positions (None: ``max_position_embeddings``).
    store_dir:    where block stores are built and reused (one per context, keyed by its text, the compressor's
                  fingerprint and B); None: a temporary folder removed after the run.
    """

    systems: tuple[str, ...] = SYSTEMS
    generation: GenerationSettings = GenerationSettings()
    block_tokens: int = 4096
    chunk_tokens: int = 5000
    gate_mode: str = "sequential"
    batch_size: int = 1
    window: Optional[int] = None
    store_dir: Optional[str] = None

    def __post_init__(self) -> None:
        systems = self.systems
        if isinstance(systems, str) or not isinstance(systems, Sequence) or not systems:
            raise ValueError(f"HarnessConfig.systems must be a non-empty list of {SYSTEMS}, got {systems!r}")
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
        if len(set(systems)) != len(systems):
            raise ValueError(f"HarnessConfig.systems repeats a system: {list(systems)}")
        object.__setattr__(self, "systems", tuple(systems))
        if not isinstance(self.generation, GenerationSettings):
            raise TypeError(f"HarnessConfig.generation must be GenerationSettings, got "
                            f"{type(self.generation).__name__}")
        for name in ("block_tokens", "chunk_tokens", "batch_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"HarnessConfig.{name} must be an int >= 1, got {v!r}")
        if self.gate_mode not in ("prefilter", "sequential"):
            raise ValueError(f"HarnessConfig.gate_mode must be 'prefilter' or 'sequential', got {self.gate_mode!r} "
                             "(to read every block without a gate, pass gate=None)")
        if self.window is not None and (not _is_int(self.window) or self.window < 1):
            raise ValueError(f"HarnessConfig.window must be None or an int >= 1, got {self.window!r}")


# ------------------------------------------------------------------------------------------------------------
# Block stores
# ------------------------------------------------------------------------------------------------------------


def _check_block_tokens(compressor: MemoryCompressor, block_tokens: int) -> None:
    C = compressor.config.chunk_size
    if not _is_int(block_tokens) or block_tokens < 1 or block_tokens % C:
        raise ValueError(f"block_tokens={block_tokens!r} must be a positive multiple of the compressor's chunk size "
                         f"{C} (a block is block_tokens / chunk_size memory embeddings)")


def store_directory(input_path: str | os.PathLike, compressor: MemoryCompressor, block_tokens: int, *,
                    cache_dir: Optional[str | os.PathLike] = None) -> str:
    """Where ``ask`` keeps the block store of ``input_path``: ``<input>.memcomp/<fingerprint>-b<B>/`` next to the
    input; with ``cache_dir`` (or the ``MEMCOMP_STORE_CACHE`` environment variable),
    ``<cache_dir>/<sha256 of the input's absolute path>/<fingerprint>-b<B>/``. One folder per (input, compressor,
    block size): another compressor or B gets its own store and never meets this one."""
    key = f"{compressor.fingerprint()[:16]}-b{int(block_tokens)}"
    path = os.path.abspath(os.fspath(input_path))
    cache_dir = cache_dir if cache_dir is not None else os.environ.get(STORE_CACHE_ENV) or None
    if cache_dir is None:
        return os.path.join(path + ".memcomp", key)
    return os.path.join(os.fspath(cache_dir), hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:16],
                        key)


def open_or_build_store(compressor: MemoryCompressor, source: Any, directory: str | os.PathLike,
                        block_tokens: int, *, progress: Optional[bool] = None,
                        replace_stale: bool = True) -> tuple[BlockStore, float, bool]:
    """``(store, seconds, reused)``: the block store of ``source`` in ``directory``, opened when a complete store of
    the same source, compressor and block size is there (the source is read and hashed, not encoded), resumed when
    an interrupted build is, else built. A complete store that differs (the input changed) is replaced when
    ``replace_stale`` (for folders this module keys by input and compressor, whose content is a stale copy), else
    ``FileExistsError`` (a folder the user named: nothing in it is removed).

    Raises ``ValueError`` for empty input, ``MemoryMismatchError`` for an interrupted build by another compressor,
    ``MemoryFileError`` for a damaged one (``BlockStore.build``)."""
    from memcomp.lychee.store import INDEX_FILE, BlockStore, BlockStoreConfig

    config = BlockStoreConfig(block_tokens=block_tokens)
    existed = os.path.isfile(os.path.join(os.fspath(directory), INDEX_FILE))
    t0 = time.perf_counter()
    try:
        store = BlockStore.build(compressor, source, directory, config, progress=progress)
        reused = existed
    except FileExistsError:
        if not replace_stale:
            raise
        store = BlockStore.build(compressor, source, directory, config, progress=progress, overwrite=True)
        reused = False
    return store, time.perf_counter() - t0, reused


# ------------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------------


def _check_items(items: Sequence[EvalItem]) -> list[EvalItem]:
    if isinstance(items, EvalItem) or not isinstance(items, Sequence) or not items:
        raise ValueError("run_eval: items must be a non-empty list of EvalItem (load_items builds them)")
    seen = set()
    for i, it in enumerate(items):
        if not isinstance(it, EvalItem):
            raise TypeError(f"run_eval: item {i} is a {type(it).__name__}, not an EvalItem")
        if it.id in seen:
            raise ValueError(f"run_eval: item id {it.id!r} is repeated")
        seen.add(it.id)
    return list(items)


def _full_context_fit(compressor: MemoryCompressor, prompts: Prompts, items: list[EvalItem],
                      settings: GenerationSettings, window: int) -> Optional[str]:
    """None when every item's full-context prompt plus ``answer_tokens`` fits ``window``; else why not."""
    for it in items:
        need = len(prompts.full_context(prompts.ids_of(it.question.strip()),
                                        compressor.tokenize(it.context).tolist())) + settings.answer_tokens
        if need > window:
            return (f"does not fit: {it.id} needs {need} positions (prompt + {settings.answer_tokens} answer tokens), "
                    f"the window is {window}")
    return None


def _summary(system: str, length: int, results: list[tuple[EvalItem, ReasonerResult]], blocks_total: list[int],
             encode_seconds: float, stores_reused: int) -> dict[str, Any]:
    n = len(results)
    hits = [sub_em(r.answer, it.answers) for it, r in results]
    acc, lo, hi = accuracy_interval(hits)
    runs = {id(r.run): r.run for _, r in results}.values()  # a batched call's RunCost is shared by its questions
    mean = lambda xs: sum(xs) / n  # noqa: E731
    kinds = sorted({r.peak_memory_kind for r in runs})
    return {"system": system, "length": length, "num_questions": n, "accuracy": acc, "ci95": [lo, hi],
            "seconds_per_question": sum(r.wall_seconds for r in runs) / n,
            "latency_seconds": mean([r.cost.latency_seconds for _, r in results]),
            "peak_memory_bytes": max(r.peak_memory_bytes for r in runs), "peak_memory_kind": ",".join(kinds),
            "positions_prefilled": mean([r.cost.positions_prefilled for _, r in results]),
            "gate_positions": mean([r.cost.gate_positions for _, r in results]),
            "tokens_generated": mean([r.cost.tokens_generated for _, r in results]),
            "blocks_read": mean([len(r.steps) for _, r in results]), "blocks_total": mean(blocks_total),
            "gate_seconds_per_question": sum(r.gate_seconds for r in runs) / n,
            "memory_seconds_per_question": sum(r.memory_seconds for r in runs) / n,
            "answer_seconds_per_question": sum(r.answer_seconds for r in runs) / n,
            "encode_seconds": encode_seconds, "stores_reused": stores_reused, "skipped": None}


def run_eval(compressor: MemoryCompressor, engine: GenerationEngine, items: Sequence[EvalItem],
             config: Optional[HarnessConfig] = None, *, gate: Optional[Gate] = None, progress: Optional[bool] = None,
             task: str = "custom") -> dict[str, Any]:
    """Run ``config.systems`` on ``items`` (see the module docstring) and return the report: ``{"task", "config",
    "metadata", "rows", "questions"}`` -- ``rows`` one dict per (system, length) in system-then-length order,
    ``questions`` one per (system, item) with the prediction, hit, blocks read and their gate scores, and cost.

    Everything is checked before any encoding or generation: raises ``ValueError`` for malformed items, a question
    longer than ``generation.question_tokens`` (naming the item and both numbers), ``lychee`` without a gate, a
    ``block_tokens`` that is not a multiple of the chunk size; ``MemoryMismatchError`` for a gate trained for another
    compressor. The systems raise as their ``answer`` methods do (a MemAgent or LycheeMemory step that cannot fit
    the window); ``full`` is skipped, with the reason in its row, at lengths where an input does not fit."""
    from memcomp.lychee.baselines import FullContext, FullContextConfig, MemAgent, MemAgentConfig
    from memcomp.lychee.reasoner import LycheeReasoner, ReasonerConfig
    from memcomp.runinfo import run_metadata

    config = config if config is not None else HarnessConfig()
    if not isinstance(config, HarnessConfig):
        raise TypeError(f"run_eval: config must be a HarnessConfig, got {type(config).__name__}")
    items = _check_items(items)
    settings = config.generation
    prompts = Prompts(compressor.tokenizer)
    for it in items:
        q = len(prompts.ids_of(it.question.strip()))
        if q > settings.question_tokens:
            raise ValueError(f"run_eval: the question of {it.id} is {q} tokens, longer than its budget of "
                             f"{settings.question_tokens} tokens (GenerationSettings.question_tokens)")
    lychee = [s for s in config.systems if s.startswith("lychee")]
    if "lychee" in config.systems:
        if gate is None:
            raise ValueError("run_eval: system 'lychee' needs a trained gate (python -m memcomp.trainers.gate); "
                             "or run 'lychee-nogate' alone")
        gate.check_compressor(compressor)
    if lychee:
        _check_block_tokens(compressor, config.block_tokens)
    window = model_window(compressor, config.window)
    lengths = sorted({it.length for it in items})
    by_length = {n: [it for it in items if it.length == n] for n in lengths}

    from tqdm.auto import tqdm

    show = progress if progress is not None else compressor.config.progress
    rows, questions = [], []
    with tempfile.TemporaryDirectory(prefix="memcomp-eval-stores-") as tmp:
        store_root = config.store_dir if config.store_dir is not None else tmp
        stores: dict[str, Any] = {}
        encode: dict[int, tuple[float, int]] = {}
        if lychee:
            fp = compressor.fingerprint()[:16]
            for n in lengths:
                seconds, reused = 0.0, 0
                for it in tqdm(by_length[n], desc=f"block stores, length {n}", disable=show is False,
                               delay=0 if show else 2.0):
                    key = hashlib.sha256(it.context.encode("utf-8", "surrogatepass")).hexdigest()[:16]
                    store, s, r = open_or_build_store(compressor, it.context,
                                                      os.path.join(store_root, f"{key}-{fp}-b{config.block_tokens}"),
                                                      config.block_tokens, progress=False)
                    stores[it.id] = store
                    seconds += s
                    reused += int(r)
                encode[n] = (seconds, reused)
        systems = {
            "lychee": lambda: LycheeReasoner(compressor, engine, gate, ReasonerConfig(
                generation=settings, gate_mode=config.gate_mode, window=config.window)),
            "lychee-nogate": lambda: LycheeReasoner(compressor, engine, None, ReasonerConfig(
                generation=settings, window=config.window)),
            "memagent": lambda: MemAgent(compressor, engine, MemAgentConfig(
                generation=settings, chunk_tokens=config.chunk_tokens, window=config.window)),
            "full": lambda: FullContext(compressor, engine, FullContextConfig(generation=settings,
                                                                              window=config.window)),
        }
        total = len(config.systems) * sum(math.ceil(len(v) / config.batch_size) for v in by_length.values())
        bar = tqdm(total=total, desc="memcomp eval", unit="call", disable=show is False, delay=0 if show else 2.0)
        try:
            for system in config.systems:
                runner = systems[system]()
                for n in lengths:
                    group = by_length[n]
                    if system == "full":
                        why = _full_context_fit(compressor, prompts, group, settings, window)
                        if why is not None:
                            rows.append({"system": system, "length": n, "num_questions": len(group), "skipped": why})
                            bar.update(math.ceil(len(group) / config.batch_size))
                            continue
                    done: list[tuple[EvalItem, ReasonerResult]] = []
                    totals: list[int] = []
                    for s in range(0, len(group), config.batch_size):
                        part = group[s:s + config.batch_size]
                        qs = [it.question for it in part]
                        if system.startswith("lychee"):
                            srcs = [stores[it.id] for it in part]
                            totals += [len(st) for st in srcs]
                        else:
                            srcs = [it.context for it in part]
                            totals += [math.ceil(compressor.tokenize(it.context).numel() / config.chunk_tokens)
                                       if system == "memagent" else 1 for it in part]
                        done += list(zip(part, runner.answer(qs, srcs)))
                        bar.update(1)
                    enc, reused = encode.get(n, (0.0, 0)) if system.startswith("lychee") else (0.0, 0)
                    rows.append(_summary(system, n, done, totals, enc, reused))
                    for it, r in done:
                        questions.append({
                            "system": system, "length": n, "id": it.id, "question": it.question,
                            "answers": list(it.answers), "prediction": r.answer, "hit": sub_em(r.answer, it.answers),
                            "blocks_read": list(r.blocks_read),
                            "scores_read": [s.score for s in r.steps], "memory_truncated": any(s.truncated
                                                                                               for s in r.steps),
                            "positions_prefilled": r.cost.positions_prefilled,
                            "gate_positions": r.cost.gate_positions, "tokens_generated": r.cost.tokens_generated,
                            "latency_seconds": r.cost.latency_seconds})
        finally:
            bar.close()
    cfg = asdict(config)
    return {"task": task, "config": cfg, "metadata": run_metadata(compressor.device), "window": window,
            "rows": rows, "questions": questions}


# ------------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------------


def ratios(report: dict[str, Any], system: str = "lychee", baseline: str = "memagent") -> list[dict[str, Any]]:
    """Per length where both ran: ``baseline / system`` of the time per question (speed-up), of the peak memory
    and of the positions prefilled, next to both accuracies."""
    rows = {(r["system"], r["length"]): r for r in report["rows"] if not r.get("skipped")}
    out = []
    for (s, n), a in sorted(rows.items(), key=lambda kv: kv[0][1]):
        b = rows.get((baseline, n))
        if s != system or b is None:
            continue
        div = lambda x, y: (x / y) if y else None  # noqa: E731
        out.append({"length": n, "speedup": div(b["seconds_per_question"], a["seconds_per_question"]),
                    "peak_memory_ratio": div(b["peak_memory_bytes"], a["peak_memory_bytes"]),
                    "prefill_ratio": div(b["positions_prefilled"], a["positions_prefilled"]),
                    f"{system}_accuracy": a["accuracy"], f"{baseline}_accuracy": b["accuracy"]})
    return out


def format_table(report: dict[str, Any]) -> str:
    """The report's rows as a Markdown table (one line per system and length)."""
    head = ("| system | length | n | accuracy [95 % CI] | s / question | peak MB | prefilled / q | generated / q | "
            "blocks read / total | gate s / q | encode s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["rows"]:
        if r.get("skipped"):
            lines.append(f"| {r['system']} | {r['length']} | {r['num_questions']} | skipped: {r['skipped']} |"
                         + " |" * 7)
            continue
        lo, hi = r["ci95"]
        lines.append(f"| {r['system']} | {r['length']} | {r['num_questions']} | {r['accuracy']:.3f} [{lo:.3f}, "
                     f"{hi:.3f}] | {r['seconds_per_question']:.3f} | {r['peak_memory_bytes'] / 2**20:.1f} | "
                     f"{r['positions_prefilled']:.0f} | {r['tokens_generated']:.1f} | {r['blocks_read']:.1f} / "
                     f"{r['blocks_total']:.1f} | {r['gate_seconds_per_question']:.3f} | {r['encode_seconds']:.2f} |")
    kinds = sorted({k for r in report["rows"] if not r.get("skipped") for k in r["peak_memory_kind"].split(",")})
    meta = report.get("metadata", {})
    lines.append("")
    lines.append(f"Task {report['task']}; peak memory: {', '.join(kinds)}; {meta.get('gpu', '?')}, torch "
                 f"{meta.get('torch', '?')}, commit {meta.get('commit', '?')}, {meta.get('date', '?')}.")
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_acc, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    for system in report["config"]["systems"]:
        rs = [r for r in report["rows"] if r["system"] == system and not r.get("skipped")]
        if not rs:
            continue
        xs = [r["length"] for r in rs]
        ax_acc.errorbar(xs, [r["accuracy"] for r in rs],
                        yerr=[[r["accuracy"] - r["ci95"][0] for r in rs], [r["ci95"][1] - r["accuracy"] for r in rs]],
                        marker="o", capsize=3, label=system)
        ax_t.plot(xs, [r["seconds_per_question"] for r in rs], marker="o", label=system)
    for ax, label in ((ax_acc, "accuracy (sub-EM, 95 % CI)"), (ax_t, "seconds per question")):
        ax.set_xscale("log")
        ax.set_xlabel("length")
        ax.set_ylabel(label)
        ax.legend()
    ax_t.set_yscale("log")
    fig.suptitle(f"memcomp eval: {report['task']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, *, name: str = "eval") -> dict[str, str]:
    """Write ``<name>.json``, ``<name>.md`` and, with matplotlib, ``<name>.png`` under ``out_dir`` (created), each
    atomically (temp + rename). Returns ``{"json": path, "markdown": path[, "plot": path]}``."""
    import json

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "markdown": os.path.join(out_dir, f"{name}.md")}
    for kind, text in (("json", json.dumps(report, indent=2)), ("markdown", format_table(report) + "\n")):
        tmp = paths[kind] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, paths[kind])
    png = os.path.join(out_dir, f"{name}.png")
    if _plot(report, png + ".tmp.png"):
        os.replace(png + ".tmp.png", png)
        paths["plot"] = png
    return paths


# ------------------------------------------------------------------------------------------------------------
# memcomp ask
# ------------------------------------------------------------------------------------------------------------


class _CountingEngine(GenerationEngine):
    """Delegates to ``inner`` and calls ``tick(1)`` after each call: a progress bar over the reasoner's engine calls
    (with one question, one call per block read and one for the answer)."""

    def __init__(self, inner: GenerationEngine, tick: Callable[[int], None]) -> None:
        self.inner, self.tick = inner, tick

    def generate(self, requests: Sequence[GenerationRequest],
                 options: SamplingOptions) -> list[list[GenerationResult]]:
        out = self.inner.generate(requests, options)
        self.tick(1)
        return out


@dataclass(frozen=True)
class AskResult:
    """What ``ask`` returns: the reasoner's ``result``, the ``store`` it read, ``store_seconds`` (building or
    opening it), ``store_reused`` (an existing store was opened: nothing was encoded) and ``cited``: per block
    read, ``(block, gate score or None, excerpt of its text)``."""

    result: ReasonerResult
    store: Any
    store_seconds: float
    store_reused: bool
    cited: tuple[tuple[int, Optional[float], str], ...] = field(default=())


def excerpt(text: str, limit: int = _EXCERPT_CHARS) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


def ask(compressor: MemoryCompressor, engine: GenerationEngine, input_path: str | os.PathLike, question: str, *,
        gate: Optional[Gate] = None, settings: Optional[GenerationSettings] = None, block_tokens: int = 4096,
        gate_mode: str = "sequential", store_dir: Optional[str | os.PathLike] = None,
        cache_dir: Optional[str | os.PathLike] = None, progress: Optional[bool] = None) -> AskResult:
    """Answer ``question`` about the text file ``input_path`` with LycheeMemory (``gate``: gated; None: every block
    read). The block store is ``store_dir`` if given, else ``store_directory(input_path, compressor, block_tokens,
    cache_dir=cache_dir)``; it is built on the first question (progress bar over the input's bytes) and reused on
    later ones. A keyed store whose input has changed since is re-encoded; a ``store_dir`` holding the store of
    another input raises ``FileExistsError`` and is left as it is. With ``progress`` (None: the compressor's
    ``config.progress``, else shown after 2 s), a second bar counts the blocks read (one engine call per block read,
    one for the answer).

    Raises ``FileNotFoundError`` for a missing input; ``ValueError`` for an empty input or question, a question
    longer than its budget, a ``block_tokens`` that is not a multiple of the chunk size; ``MemoryMismatchError`` for
    a gate, or a ``store_dir`` store, of another compressor -- all before anything is encoded."""
    import pathlib

    from memcomp.lychee.reasoner import LycheeReasoner, ReasonerConfig
    from memcomp.lychee.store import INDEX_FILE, BlockStore

    settings = settings if settings is not None else GenerationSettings()
    path = os.fspath(input_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path} not found")
    if os.path.getsize(path) == 0:
        raise ValueError(f"input file {path} is empty")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    _check_block_tokens(compressor, block_tokens)
    config = ReasonerConfig(generation=settings, gate_mode=gate_mode)
    reasoner = LycheeReasoner(compressor, engine, gate, config)  # checks the engine and the gate before encoding
    q = len(reasoner.prompts.ids_of(question.strip()))
    if q > settings.question_tokens:
        raise ValueError(f"the question is {q} tokens, longer than its budget of {settings.question_tokens} "
                         "tokens (--question-tokens)")
    named = store_dir is not None
    if not named:
        store_dir = store_directory(path, compressor, block_tokens, cache_dir=cache_dir)
    elif os.path.isfile(os.path.join(os.fspath(store_dir), INDEX_FILE)):
        BlockStore.open(store_dir, compressor)  # MemoryMismatchError names a store of another compressor
    store, seconds, reused = open_or_build_store(compressor, pathlib.Path(path), store_dir, block_tokens,
                                                 progress=progress, replace_stale=not named)
    from tqdm.auto import tqdm

    show = progress if progress is not None else compressor.config.progress
    # Without a gate every block is read; with one, how many is known only at the end.
    bar = tqdm(total=len(store) + 1 if gate is None else None, desc="blocks read (+ answer)", unit="call",
               disable=show is False, delay=0 if show else 2.0)
    try:
        counted = LycheeReasoner(compressor, _CountingEngine(engine, bar.update), gate, config)
        (result,) = counted.answer([question], [store])
    finally:
        bar.close()
    cited = tuple((st.block, st.score, excerpt(store.text(st.block))) for st in result.steps)
    return AskResult(result=result, store=store, store_seconds=seconds, store_reused=reused, cited=cited)
