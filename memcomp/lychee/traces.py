"""Reasoner SFT data: the synthetic task's ideal working-memory traces as training records, one per model call.

LycheeMemory's reasoner is taught the loop before RL (issue plan; seed 000 trains its reasoner from a model that
already follows MemAgent's prompt structure). The synthetic generator (``memcomp.eval.synthetic``) knows which
facts each block holds, so ``memory_trace`` writes the ideal working memory after every block; every call the
systems make at inference becomes one supervised record here, with the prompts of ``memcomp.lychee.prompts``:

- ``lychee_update``: [block memory][problem][previous memory] -> updated memory (the block compressed by the
  compressor being trained, its tokens in ``section_ids``);
- ``memagent_update``: the same step over a raw-text chunk (MemAgent's prompt);
- ``final_answer``: [problem][memory after every block] -> ``\\boxed{answer}`` (shared by both systems);
- ``full_context``: [whole context][problem] -> ``\\boxed{answer}``.

One model learns all four, so the systems compared by ``memcomp.lychee.harness`` share one set of weights and one
training budget. Update steps that read evidence are all kept; of the steps that leave the memory unchanged,
``unrelated_steps`` per example and system are kept at random (a 512-token context has ~8 blocks, most without
evidence: keeping them all would teach mostly copying).

Records are JSON objects: ``{"kind", "problem", "memory", "section_ids", "target"}`` (``memory`` is absent for
``full_context``, ``section_ids`` for ``final_answer``). Token ids are stored, not text, so a block is exactly the
token slice the block store encodes (decoding and re-tokenizing a slice cut mid-word can change its ids).
``trace_sample`` turns a record into the ``memcomp.tasks.Sample`` the packed trainers consume; the data stream of
``memcomp.data`` reads them from a JSONL file (schema ``"trace"``, mixture ``"reasoner"``).
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from memcomp.eval.synthetic import NO_MEMORY, SyntheticExample, example_blocks, memory_trace

__all__ = ["TRACE_KINDS", "MEMORY_KINDS", "TraceConfig", "trace_records", "check_trace_record", "turn_end_ids",
           "trace_sample"]

TRACE_KINDS = ("lychee_update", "memagent_update", "final_answer", "full_context")
# Kinds whose section is compressed into memory (the others are plain-text prompts).
MEMORY_KINDS = ("lychee_update",)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class TraceConfig:
    """Which records ``trace_records`` writes.

    block_tokens:    LycheeMemory's block size B in tokens (a multiple of the compressor's chunk size).
    chunk_tokens:    MemAgent's raw chunk size in tokens.
    unrelated_steps: update steps without evidence kept per example and system (at random; all evidence steps are
                     kept).
    kinds:           the record kinds to write (a subset of ``TRACE_KINDS``).
    """

    block_tokens: int = 4096
    chunk_tokens: int = 5000
    unrelated_steps: int = 2
    kinds: tuple[str, ...] = TRACE_KINDS

    def __post_init__(self) -> None:
        for name in ("block_tokens", "chunk_tokens"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"TraceConfig.{name} must be an int >= 1, got {v!r}")
        if not _is_int(self.unrelated_steps) or self.unrelated_steps < 0:
            raise ValueError(f"TraceConfig.unrelated_steps must be an int >= 0, got {self.unrelated_steps!r}")
        kinds = self.kinds
        if isinstance(kinds, str) or not isinstance(kinds, Sequence) or not kinds:
            raise ValueError(f"TraceConfig.kinds must be a non-empty list of {TRACE_KINDS}, got {kinds!r}")
        unknown = [k for k in kinds if k not in TRACE_KINDS]
        if unknown:
            raise ValueError(f"TraceConfig.kinds: unknown kind(s) {unknown}; choose from {', '.join(TRACE_KINDS)}")
        object.__setattr__(self, "kinds", tuple(kinds))


def _updates(example: SyntheticExample, tokenizer: Any, size: int, kind: str, keep: int,
             rng: random.Random) -> tuple[list[dict[str, Any]], str, tuple[int, ...]]:
    """The update records over blocks of ``size`` tokens read in order, the memory after the last block, and the
    context's token ids (the blocks' tokenization, reused for the full-context record)."""
    blocks = example_blocks(example, tokenizer, size)
    trace = memory_trace(example, blocks, list(range(blocks.num_blocks)))
    previous = [NO_MEMORY, *trace.memories[:-1]]
    steps = list(range(blocks.num_blocks))
    changed = [s for s in steps if trace.memories[s] != previous[s]]
    unchanged = [s for s in steps if trace.memories[s] == previous[s]]
    picked = sorted(changed + rng.sample(unchanged, min(keep, len(unchanged))))
    problem = example.question
    out = [{"kind": kind, "problem": problem, "memory": previous[s],
            "section_ids": list(blocks.block_ids(s)), "target": trace.memories[s]}
           for s in picked]
    return out, trace.memories[-1], blocks.input_ids


def trace_records(examples: Sequence[SyntheticExample], tokenizer: Any, config: Optional[TraceConfig] = None, *,
                  seed: int = 0) -> list[dict[str, Any]]:
    """The SFT records of ``examples`` (see the module docstring), example by example: its LycheeMemory updates,
    MemAgent updates, final answer and full-context answer (those of ``config.kinds``). ``tokenizer``: the
    compressor's (a Hugging Face fast tokenizer: evidence is located through its offsets). The unrelated steps kept
    are drawn from ``random.Random(seed)``: the same arguments give the same records.

    Raises ``TypeError`` for a non-``SyntheticExample``; ``ValueError`` for an empty list; what
    ``example_blocks`` raises for a tokenizer without offsets."""
    config = config if config is not None else TraceConfig()
    if not isinstance(config, TraceConfig):
        raise TypeError(f"trace_records: config must be a TraceConfig, got {type(config).__name__}")
    if isinstance(examples, SyntheticExample) or not isinstance(examples, Sequence):
        raise TypeError("trace_records: examples must be a list of SyntheticExample")
    if not examples:
        raise ValueError("trace_records: no examples")
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, SyntheticExample):
            raise TypeError(f"trace_records: example {i} is a {type(ex).__name__}, not a SyntheticExample")
        lychee, final_memory, context_ids = _updates(ex, tokenizer, config.block_tokens, "lychee_update",
                                                     config.unrelated_steps, rng)
        memagent, _, _ = _updates(ex, tokenizer, config.chunk_tokens, "memagent_update", config.unrelated_steps, rng)
        answer = f"\\boxed{{{ex.answer}}}"
        records = lychee + memagent + [
            {"kind": "final_answer", "problem": ex.question, "memory": final_memory, "target": answer},
            {"kind": "full_context", "problem": ex.question,
             "section_ids": list(context_ids), "target": answer}]
        out += [r for r in records if r["kind"] in config.kinds]
    return out


def check_trace_record(rec: Any) -> Optional[str]:
    """Why ``rec`` is not a valid trace record, or None. Checked: a known ``kind``; non-empty str ``problem`` and
    ``target``; a str ``memory`` where the kind has one; a non-empty list of non-negative int ``section_ids`` where
    it has a section."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    kind = rec.get("kind")
    if kind not in TRACE_KINDS:
        return f"kind must be one of {', '.join(TRACE_KINDS)}, got {kind!r}"
    for name in ("problem", "target"):
        if not isinstance(rec.get(name), str) or not rec[name].strip():
            return f"{kind}: missing or empty string field {name!r}"
    if kind != "full_context" and (not isinstance(rec.get("memory"), str) or not rec["memory"]):
        return f"{kind}: missing or empty string field 'memory'"
    if kind != "final_answer":
        ids = rec.get("section_ids")
        if not isinstance(ids, list) or not ids or not all(_is_int(v) and v >= 0 for v in ids):
            return f"{kind}: section_ids must be a non-empty list of token ids (ints >= 0)"
    return None


def turn_end_ids(tokenizer: Any) -> list[int]:
    """The token a trained reasoner ends each call with: the engines stop on the tokenizer's EOS and, where it is
    one token, ChatML's ``<|im_end|>`` (``memcomp.lychee.reasoner``); a tokenizer without ``<|im_end|>`` as one token
    (the demo's small BPE) ends on its EOS. Raises ``ValueError`` when it has neither."""
    tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
        return [tid]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|im_end|> as one token nor an EOS token: a reasoner trained on "
                         "it could not end a call")
    return [int(tokenizer.eos_token_id)]


def trace_sample(rec: dict[str, Any], prompts: Any, end: Sequence[int]) -> Any:
    """The ``memcomp.tasks.Sample`` of one record, laid out exactly as the system builds that call at inference:
    ``lychee_update``: before = the LycheeMemory prefix, context = the block's tokens (compressed in the trainer's
    forward), after = the update prompt; the plain-text kinds: their whole prompt as ``after``, no memory. The
    target is ``rec["target"]`` tokenized, then ``end`` (``turn_end_ids``: the token the engines stop on).
    ``prompts``: a ``memcomp.lychee.prompts.Prompts`` over the compressor's tokenizer.

    Raises ``ValueError`` naming the fault for a record ``check_trace_record`` rejects."""
    from memcomp.tasks import Sample

    why = check_trace_record(rec)
    if why is not None:
        raise ValueError(f"trace record: {why}")
    kind, problem = rec["kind"], rec["problem"].strip()
    target = prompts.ids_of(rec["target"]) + list(end)
    if kind == "lychee_update":
        before, after = prompts.lychee_update(problem, rec["memory"])
        return Sample(kind, list(rec["section_ids"]), before, after, target)
    if kind == "memagent_update":
        after = prompts.memagent_update(problem, rec["memory"], list(rec["section_ids"]))
    elif kind == "final_answer":
        after = prompts.final(problem, rec["memory"])
    else:
        after = prompts.full_context(problem, list(rec["section_ids"]))
    return Sample(kind, [], [], after, target)
