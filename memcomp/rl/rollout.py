"""DAPO's data and policy side: QA records, memories precomputed once and checked by fingerprint, rollout groups
with their rewards, and the policy's log-probabilities from the packed forward.

- ``read_qa_records(path)``: ``{"context", "question", "answers": [...]}`` JSONL (``"answer"``, one string, is
  read as a one-element list); a record without answers is an error naming its line.
- ``MemoryBank``: the memory of every distinct context, encoded once by the SFT compressor and stored as
  ``Memory`` files (safetensors with the compressor's fingerprint) with an index; loading checks every memory
  against the fingerprint the run expects, so a bank from another compressor is refused.
- ``score_group``: rewards of one prompt's responses -- the correctness (rule or judge) and the overlong-shaped
  reward; a response longer than the maximum is an error (an engine that ignored its cap), not a penalty.
- ``MemoryPolicy``: the policy DAPO trains, a compressor's decoder reading precomputed memories. Its forward is
  ``MemoryCompressor.forward_packed`` without the encoder: the memory embeddings written at the placeholder slots
  of a packed row, the decoder over all samples (packed attention), and the fused linear cross-entropy on the
  target rows only; it returns the per-token log-probabilities (``-loss``) of the response tokens.

Uses ``memcomp.packing`` and ``memcomp.fused``; the trainer (``memcomp.trainers.dapo``) composes these with
``advantages``, ``loss`` and an engine.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from memcomp.memory import Memory, MemoryMismatchError
from memcomp.rl.rewards import normalize_answer, overlong_shaping, rule_reward, validate_gold_answers
from memcomp.tasks import Sample

# The demo's tiny tokenizer spells ChatML's end marker as text: an unboxed answer ends there.
_END_MARKER = "<|im_end|>"


@dataclass(frozen=True)
class QARecord:
    """One DAPO prompt: the ``context`` (compressed into memory), the ``question`` and its gold ``answers``."""

    context: str
    question: str
    answers: tuple[str, ...]


def _check_exact_answers(answers) -> None:
    if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers:
        raise ValueError("a QA record without gold answers cannot be rewarded: every record needs a list of at least "
                         "one answer")
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"gold answers must be non-empty strings, got {list(answers)!r}")


def read_qa_records(path: str, match: str = "sub_em") -> list[QARecord]:
    """Read QA records from JSONL. ``match``: the reward's matching rule ("em" / "sub_em" compare SQuAD-normalised
    answers, so an answer that normalises to nothing is refused: ``validate_gold_answers``; "exact" compares
    verbatim, so any non-empty answer is fine). Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` naming the line for malformed JSON, a missing or empty context / question, or a record
    without answers."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"QA file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not JSON ({exc})") from exc
            answers = r.get("answers", [r["answer"]] if isinstance(r.get("answer"), str) else None)
            for key in ("context", "question"):
                if not isinstance(r.get(key), str) or not r[key].strip():
                    raise ValueError(f"{path}:{i}: a QA record needs a non-empty {key!r}")
            try:
                (_check_exact_answers if match == "exact" else validate_gold_answers)(
                    answers if answers is not None else [])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{i}: {exc}") from exc
            out.append(QARecord(r["context"], r["question"], tuple(answers)))
    if not out:
        raise ValueError(f"{path}: no QA records")
    return out


def context_key(context: str) -> str:
    return hashlib.sha256(context.encode()).hexdigest()[:24]


class MemoryBank:
    """Memories of contexts, one ``Memory`` file each under ``directory`` plus ``index.json`` (key -> file, the
    fingerprint of the compressor that encoded them, ``doc_tokens``)."""

    def __init__(self, directory: str, memories: dict[str, Memory], fingerprint: str) -> None:
        self.directory, self.memories, self.fingerprint = directory, memories, fingerprint

    @staticmethod
    @torch.no_grad()
    def build(comp, contexts: Sequence[str], directory: str, *, doc_tokens: int, batch: int = 64) -> MemoryBank:
        """Encode the contexts not yet in ``directory`` (each cut to its first ``doc_tokens`` tokens) with ``comp``
        and store them; existing files are reused only when their fingerprint is ``comp``'s (else
        ``MemoryMismatchError``: remove the folder or point ``rl.memory_dir`` elsewhere)."""
        os.makedirs(directory, exist_ok=True)
        fp = comp.fingerprint()
        index_path = os.path.join(directory, "index.json")
        index = {"fingerprint": fp, "doc_tokens": doc_tokens, "files": {}}
        if os.path.isfile(index_path):
            with open(index_path) as f:
                index = json.load(f)
            if index["fingerprint"] != fp or index["doc_tokens"] != doc_tokens:
                raise MemoryMismatchError(
                    f"{directory} holds memories of compressor {index['fingerprint']} at doc_tokens "
                    f"{index['doc_tokens']}, this run's compressor is {fp} at {doc_tokens}: memories from another "
                    "compressor; remove the folder or set rl.memory_dir elsewhere")
        todo = [c for c in dict.fromkeys(contexts) if context_key(c) not in index["files"]]
        for b0 in range(0, len(todo), batch):
            part = todo[b0:b0 + batch]
            ids = [comp.tokenize(c)[:doc_tokens] for c in part]
            for c, emb, n in zip(part, comp.encode_chunks(ids), ids):
                key = context_key(c)
                Memory(emb.detach().float().cpu(), len(n), comp.config.chunk_size, fp).save(
                    os.path.join(directory, f"{key}.safetensors"))
                index["files"][key] = f"{key}.safetensors"
        tmp = f"{index_path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(index, f)
        os.replace(tmp, index_path)
        return MemoryBank.load(directory, fp)

    @staticmethod
    def load(directory: str, fingerprint: str) -> MemoryBank:
        """Read every memory of the bank; each must carry ``fingerprint`` (``MemoryMismatchError`` otherwise, naming
        the file). Raises ``FileNotFoundError`` without an index."""
        index_path = os.path.join(directory, "index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"no memory bank in {directory} (index.json missing)")
        with open(index_path) as f:
            index = json.load(f)
        memories = {}
        for key, name in index["files"].items():
            m = Memory.load(os.path.join(directory, name))
            if m.fingerprint != fingerprint:
                raise MemoryMismatchError(f"{os.path.join(directory, name)} was encoded by compressor {m.fingerprint}, "
                                          f"this run reads memories of {fingerprint} (its init_from): a memory from "
                                          "another compressor; re-encode (remove the bank)")
            memories[key] = m
        return MemoryBank(directory, memories, fingerprint)

    def get(self, context: str) -> Memory:
        key = context_key(context)
        if key not in self.memories:
            raise KeyError(f"no memory for a context starting {context[:40]!r} in {self.directory}")
        return self.memories[key]


# --------------------------------------------------------------------------------------------------
# Rewards of one group
# --------------------------------------------------------------------------------------------------

def strip_end_marker(text: str) -> str:
    """``text`` up to where ChatML's end marker begins, for tokenizers that spell it as text (the demo's: 7 tokens,
    "<", "|", "im", ...). A marker cut short by a token budget counts too ("Decode<|im" -> "Decode"); a "<" that
    starts neither the marker nor, at the very end, a prefix of it is kept ("<https://json.org>")."""
    for i, ch in enumerate(text):
        if ch == "<" and (text.startswith(_END_MARKER[:-2], i) or _END_MARKER.startswith(text[i:])):
            return text[:i]
    return text


def plain_reward(response: str, gold_answers: Sequence[str], mode: str = "em") -> float:
    """Binary reward of an answer given without ``\\boxed{}``: the response up to ChatML's end marker
    (``strip_end_marker``) against any gold answer. "exact": its first whitespace-separated word equals a gold
    answer verbatim (the demo's held-out criterion, ``memcomp.demo.run.answer_word``); "em" / "sub_em":
    SQuAD-normalised, equal / one contains the other. An empty answer scores 0."""
    answer = strip_end_marker(response)
    if mode == "exact":
        _check_exact_answers(gold_answers)
        return float(answer.split()[:1] in ([g] for g in gold_answers))
    golds = validate_gold_answers(gold_answers)
    pred = normalize_answer(answer)
    if not pred:
        return 0.0
    if mode == "em":
        return float(pred in golds)
    return float(any(g in pred or pred in g for g in golds))


@dataclass
class Group:
    """One prompt's G rollouts: the record's index, the decoder prompt (``before`` memory ``after``), the number
    of context tokens its memory covers, each response's token ids and rollout-time log-probabilities, the
    correctness (the filter value of dynamic sampling) and the shaped reward."""

    record: int
    context: str
    before: list[int]
    after: list[int]
    context_tokens: int
    responses: list[list[int]]
    old_logp: list[torch.Tensor]
    correct: list[float]
    rewards: list[float] = field(default_factory=list)


def score_group(texts: Sequence[str], lengths: Sequence[int], answers: Sequence[str], *, boxed: bool, match: str,
                max_response_tokens: int, overlong_buffer: int, overlong_factor: float,
                judged: Optional[Sequence[float]] = None) -> tuple[list[float], list[float]]:
    """-> (correctness, shaped reward) of one group's responses. Correctness is ``judged`` when given (the
    generative judge's verdicts), else the rule reward (``rule_reward`` on the ``\\boxed{}`` answer, or
    ``plain_reward`` without ``boxed``); the reward adds ``overlong_shaping`` after judging. Raises
    ``ValueError`` for a response longer than ``max_response_tokens`` (the engine ignored its cap)."""
    for n in lengths:
        if n > max_response_tokens:
            raise ValueError(f"a response of {n} tokens is longer than rl.max_response_tokens={max_response_tokens}: "
                             "the rollout engine did not stop at its limit")
    if judged is not None:
        correct = [float(v) for v in judged]
    else:
        fn = rule_reward if boxed else plain_reward
        correct = [fn(t, answers, match) for t in texts]
    shaped = [c + overlong_shaping(int(n), max_response_tokens, overlong_buffer, overlong_factor)
              for c, n in zip(correct, lengths)]
    return correct, shaped


# --------------------------------------------------------------------------------------------------
# The policy's log-probabilities
# --------------------------------------------------------------------------------------------------

def response_samples(groups: Sequence[Group], pad_id: int) -> list[Sample]:
    """One ``Sample`` per response (prompt around the memory, the response as target), for ``PackingCollator``.
    The context is ``context_tokens`` placeholders: it only sets the memory block's size, the embeddings come
    from the bank (the encoder does not run)."""
    return [Sample("rl", [pad_id] * g.context_tokens, list(g.before), list(g.after), list(r))
            for g in groups for r in g.responses]


class MemoryPolicy(nn.Module):
    """The DAPO policy: ``compressor``'s decoder reading precomputed memories. Wrapped by DeepSpeed as a whole
    (its forward is the engine's), so ZeRO-3 gathers the LM head, which the fused loss reads outside its
    module's forward (register it as an external parameter)."""

    def __init__(self, compressor) -> None:
        super().__init__()
        self.compressor = compressor

    def forward(self, row, memory: torch.Tensor) -> torch.Tensor:
        """``row``: a ``PackedBatch`` of response samples; ``memory [row.n_chunks, d]``: the memory embeddings of
        its samples in row order. -> ``logp [row.target_rows.numel()]`` fp32, the log-probability of each
        response token under the current policy (differentiable). Raises ``ValueError`` when the memory does
        not fill the row's slots."""
        from memcomp.attention import check_checkpointing, packed_attention_mode
        from memcomp.fused import linear_cross_entropy

        comp = self.compressor
        if comp.training:
            check_checkpointing(comp.model)
        if memory.dim() != 2 or memory.shape[0] != row.n_chunks or memory.shape[1] != comp.hidden_size:
            raise ValueError(f"MemoryPolicy: the row has {row.n_chunks} memory slots of width {comp.hidden_size}, "
                             f"got memory {tuple(memory.shape)}")
        row = row.to(comp.device)
        with packed_attention_mode(comp.model):
            embeds = comp.model.get_input_embeddings()(row.dec_input_ids)
            embeds = embeds.index_put((row.memory_slots,), memory.to(device=embeds.device, dtype=embeds.dtype))
            cu = row.dec_cu_seqlens
            hidden = comp.base(inputs_embeds=embeds[None], position_ids=row.dec_position_ids[None],
                               cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=row.dec_max_seqlen,
                               max_length_k=row.dec_max_seqlen, use_cache=False).last_hidden_state[0]
        head = comp.model.get_output_embeddings()
        losses = linear_cross_entropy(hidden[row.target_rows], head.weight, row.target_ids,
                                      getattr(head, "bias", None), check_inputs=False)
        return -losses.float()


def row_memory(row, samples: Sequence[Sample], memories: Sequence[torch.Tensor]) -> torch.Tensor:
    """The memory embeddings of a packed row's samples, in the row's sample order (``row.sample_index`` indexes
    ``samples`` / ``memories``)."""
    return torch.cat([memories[i] for i in row.sample_index])


def row_targets(row, per_sample: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample token values (old log-probabilities, advantages) in the order of the row's target
    tokens (samples in row order, each response's tokens in order)."""
    return torch.cat([per_sample[i] for i in row.sample_index])

