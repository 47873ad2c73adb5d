"""RULER-HQA: HotpotQA questions hidden among N documents, built as MemAgent builds it.

The user supplies HotpotQA's dev-distractor file (``hotpot_dev_distractor_v1.json``: a JSON list of records
``{"_id", "question", "answer", "context": [[title, [sentence, ...]], ...], "supporting_facts": [[title,
sentence_id], ...]}``); nothing is downloaded.

Followed from MemAgent's builder (``taskutils/memory_data/different_docs_eval.py`` of BytedTsinghua-SIA/MemAgent,
read at commit 76b7a65):

- a document is ``f"{title}\\n{''.join(sentences)}"`` (HotpotQA's sentences carry their own leading spaces);
- the pool is every unique document of the file, ``sorted(set(...))``;
- a question keeps its own context paragraphs (10 in the distractor setting), in file order, and draws
  ``N - len(own)`` further documents with ``random.sample`` from the pool minus its own;
- own + drawn are shuffled with ``random.Random(4).shuffle`` (the shuffle seed 4 of that script, the same for
  every question: at a given N every question's own paragraphs land on the same positions, a regularity a gate
  trained on RULER-HQA could learn; ``shuffle_seed=None`` shuffles each question with its own generator instead),
  numbered ``"Document {i}:\\n{document}"`` from 1 and joined by ``"\\n\\n"``
  (``memcomp.eval.documents.format_documents``);
- answers are ``[record["answer"]]``; the record keeps MemAgent's keys (``context``, ``input``, ``answers``,
  ``num_docs``, ``index``); N in {50, 100, ..., 12800} gives about 7K ... 1.75M tokens (MemAgent also has
  25,600 ~ 3.5M; any N up to the pool size works).

Where this could not be followed exactly, and what is done instead:

- MemAgent draws every question's documents from the GLOBAL ``random`` seeded once with 42, inside a process
  pool (``tqdm.contrib.concurrent.process_map``): each worker continues the forked state in whatever order it
  receives questions, so its draws depend on scheduling and cannot be reproduced. Here each question draws from
  its own ``random.Random("memcomp.ruler_hqa:{seed}:{N}:{index}")`` (seed 42 by default): the same file, seed
  and N always give the same documents, in any order or subset of questions. The documents differ from
  MemAgent's released files; the construction does not.
- MemAgent silently uses the whole pool when N exceeds it (and shuffles the pool list in place); here an N larger
  than the pool raises ``ValueError``, as does an N smaller than a question's own paragraph count (where
  MemAgent's ``random.sample`` raises).
- MemAgent evaluates 128 dev questions kept only where Qwen2.5-7B and its instruct model could not answer without
  the context (``filter.py`` / ``filter2.py``: model runs, not reproducible offline). Pass their indices as
  ``indices`` to evaluate the same questions; by default every question of the file is built.
- Added for the gate: which documents are gold (the question's own paragraphs whose title is named in
  ``supporting_facts``) and which are the question's own (gold + its 8 HotpotQA distractors), as 0-based
  positions in ``documents``; "Document i" in the text is position ``i - 1``.
"""

from __future__ import annotations

import json
import numbers
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from memcomp.eval._io import PathLike, write_jsonl_atomic
from memcomp.eval.documents import Span, format_documents
from memcomp.eval.scoring import normalize_answer

__all__ = ["RULER_HQA_NUM_DOCS", "DEFAULT_SEED", "SHUFFLE_SEED", "HotpotQAFormatError", "HotpotQAQuestion", "HotpotQA",
           "paragraph_text", "load_hotpotqa", "RulerHQARecord", "build_ruler_hqa", "write_ruler_hqa",
           "read_ruler_hqa"]

# MemAgent's lengths up to 1.75M tokens: 50 -> ~7K ... 12,800 -> ~1.75M.
RULER_HQA_NUM_DOCS = (50, 100, 200, 400, 800, 1600, 3200, 6400, 12800)
DEFAULT_SEED = 42  # MemAgent's random.seed(42)
SHUFFLE_SEED = 4  # MemAgent's random.Random(4).shuffle(all_docs)


class HotpotQAFormatError(ValueError):
    """A HotpotQA file (or a RULER-HQA file written by ``write_ruler_hqa``) that is not in the expected format."""


def paragraph_text(title: str, sentences: Sequence[str]) -> str:
    """MemAgent's document: the title, a newline, the sentences concatenated as stored (``"T\\n s1 s2"``)."""
    return f"{title}\n{''.join(sentences)}"


@dataclass(frozen=True)
class HotpotQAQuestion:
    """One HotpotQA record: ``index`` in the file, ``id`` (``_id``), the question, its answers, ``paragraphs`` (the
    pool indices of its own context paragraphs, in file order) and ``supporting`` (the pool indices of those
    paragraphs whose title ``supporting_facts`` names, in context order)."""

    index: int
    id: str
    question: str
    answers: tuple[str, ...]
    paragraphs: tuple[int, ...]
    supporting: tuple[int, ...]


@dataclass(frozen=True)
class HotpotQA:
    """A loaded HotpotQA file: ``pool`` (every unique document, sorted) and its ``questions`` in file order."""

    pool: tuple[str, ...]
    questions: tuple[HotpotQAQuestion, ...]


def _fail(where: str, i: int, rec: Any, msg: str) -> HotpotQAFormatError:
    rid = rec.get("_id") if isinstance(rec, Mapping) else None
    who = f"record {i}" + (f" (_id {rid!r})" if isinstance(rid, str) else "")
    return HotpotQAFormatError(f"{where}: {who}: {msg}")


def _check_record(where: str, i: int, rec: Any) -> tuple[str, str, str, list[tuple[str, list[str]]], list[str]]:
    if not isinstance(rec, Mapping):
        raise _fail(where, i, rec, f"expected a JSON object, got {type(rec).__name__}")
    for field in ("_id", "question", "answer", "context", "supporting_facts"):
        if field not in rec:
            raise _fail(where, i, rec, f"missing field {field!r}")
    rid, question, answer = rec["_id"], rec["question"], rec["answer"]
    if not isinstance(rid, str) or not rid:
        raise _fail(where, i, rec, f"field '_id' must be a non-empty string, got {rid!r}")
    if not isinstance(question, str) or not question.strip():
        raise _fail(where, i, rec, f"field 'question' must be a non-empty string, got {question!r}")
    if not isinstance(answer, str) or not normalize_answer(answer):
        raise _fail(where, i, rec, f"field 'answer' must be a string that is not empty after normalisation (it is "
                                   f"matched as a sub-string), got {answer!r}")
    context = rec["context"]
    if not isinstance(context, list) or not context:
        raise _fail(where, i, rec, "field 'context' must be a non-empty list of [title, [sentences...]]")
    paragraphs = []
    for j, item in enumerate(context):
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], list) or not all(isinstance(s, str) for s in item[1])):
            raise _fail(where, i, rec, f"field 'context'[{j}] must be [title, [sentence, ...]] of strings, got "
                                       f"{str(item)[:80]}")
        paragraphs.append((item[0], item[1]))
    facts = rec["supporting_facts"]
    if not isinstance(facts, list) or not facts:
        raise _fail(where, i, rec, "field 'supporting_facts' must be a non-empty list of [title, sentence_id] (the "
                                   "gold documents are read from it)")
    titles = {t for t, _ in paragraphs}
    support = []
    for j, fact in enumerate(facts):
        if (not isinstance(fact, list) or len(fact) != 2 or not isinstance(fact[0], str)
                or not isinstance(fact[1], int) or isinstance(fact[1], bool)):
            raise _fail(where, i, rec, f"field 'supporting_facts'[{j}] must be [title, sentence_id], got {fact!r}")
        if fact[0] not in titles:
            raise _fail(where, i, rec, f"field 'supporting_facts'[{j}] names the title {fact[0]!r}, which is not "
                                       "in the record's 'context'")
        support.append(fact[0])
    return rid, question, answer, paragraphs, support


def load_hotpotqa(source: Union[PathLike, Sequence[Mapping[str, Any]]]) -> HotpotQA:
    """Read a HotpotQA distractor-setting file (a path to the JSON list) or its already-parsed records, validate
    every record, and build the document pool.

    Every record is checked before anything is built: a missing or malformed field raises
    ``HotpotQAFormatError`` (a ``ValueError``) naming the file, the record number and ``_id``, and the field; so
    does a file that is not JSON or not a list, and a supporting fact whose title is not in the record's context.
    A missing file raises ``FileNotFoundError``."""
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        with open(where, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise HotpotQAFormatError(f"{where}: not valid JSON ({e})") from e
    else:
        where, records = "HotpotQA records", source
    if not isinstance(records, list):
        raise HotpotQAFormatError(f"{where}: expected a JSON list of HotpotQA records, got {type(records).__name__}")
    if not records:
        raise HotpotQAFormatError(f"{where}: no records")
    checked = [_check_record(where, i, rec) for i, rec in enumerate(records)]
    pool = tuple(sorted({paragraph_text(t, s) for *_, paragraphs, _ in checked for t, s in paragraphs}))
    index_of = {doc: k for k, doc in enumerate(pool)}
    questions = []
    for i, (rid, question, answer, paragraphs, support) in enumerate(checked):
        own = tuple(index_of[paragraph_text(t, s)] for t, s in paragraphs)
        wanted = set(support)
        gold = tuple(k for k, (t, _) in zip(own, paragraphs) if t in wanted)
        questions.append(HotpotQAQuestion(index=i, id=rid, question=question, answers=(answer,), paragraphs=own,
                                          supporting=gold))
    return HotpotQA(pool=pool, questions=tuple(questions))


@dataclass(frozen=True)
class RulerHQARecord:
    """One RULER-HQA question at ``num_docs`` documents.

    ``documents[p]`` is "Document p+1" of the context; ``gold`` and ``own`` are 0-based positions into
    ``documents`` (sorted): the supporting paragraphs, and all of the question's own paragraphs (gold included).
    ``index`` is the question's position in the HotpotQA file (MemAgent's ``index``), ``id`` its ``_id``."""

    index: int
    id: str
    question: str
    answers: tuple[str, ...]
    num_docs: int
    documents: tuple[str, ...]
    gold: tuple[int, ...]
    own: tuple[int, ...]

    def format(self) -> tuple[str, tuple[Span, ...]]:
        """``(context, spans)``: the "Document i:" text and each document's character span in it."""
        return format_documents(self.documents)

    @property
    def context(self) -> str:
        return self.format()[0]

    def gold_spans(self) -> tuple[Span, ...]:
        """The character spans of the gold documents in ``context`` (the evidence for ``label_blocks``)."""
        spans = self.format()[1]
        return tuple(spans[p] for p in self.gold)

    def to_json(self) -> dict[str, Any]:
        """MemAgent's record keys (``context``, ``input``, ``answers``, ``num_docs``, ``index``) plus ``_id``,
        ``gold``, ``own`` and ``document_spans`` (from which ``read_ruler_hqa`` recovers the documents)."""
        context, spans = self.format()
        return {"context": context, "input": self.question, "answers": list(self.answers), "num_docs": self.num_docs,
                "index": self.index, "_id": self.id, "gold": list(self.gold), "own": list(self.own),
                "document_spans": [list(s) for s in spans]}


def _question_rng(seed: int, num_docs: int, index: int) -> random.Random:
    # A str seed is hashed with SHA-512 by random.seed (version 2): stable across runs, platforms and
    # PYTHONHASHSEED, and independent between questions, so any subset or order of questions draws the same.
    return random.Random(f"memcomp.ruler_hqa:{seed}:{num_docs}:{index}")


def _build_one(data: HotpotQA, q: HotpotQAQuestion, num_docs: int, seed: int,
               shuffle_seed: Optional[int]) -> RulerHQARecord:
    own = list(q.paragraphs)
    excluded = sorted(set(own))
    rng = _question_rng(seed, num_docs, q.index)
    # random.sample picks positions from the population's length alone, so sampling positions of the candidate
    # list (the pool minus the question's own paragraphs, MemAgent's `addition_docs`) and mapping each to its pool
    # index draws exactly what sampling the list would, without building a pool-sized list per question.
    drawn = []
    for r in rng.sample(range(len(data.pool) - len(excluded)), num_docs - len(own)):
        for k in excluded:  # the r-th pool index that is not excluded (excluded is sorted and short)
            if k > r:
                break
            r += 1
        drawn.append(r)
    doc_ids = own + drawn
    # Shuffling positions with Random(shuffle_seed) permutes exactly as MemAgent's shuffle of the documents
    # themselves (shuffle draws depend only on the list's length) and keeps track of where each one went.
    order = list(range(len(doc_ids)))
    (rng if shuffle_seed is None else random.Random(shuffle_seed)).shuffle(order)
    support = set(q.supporting)
    own_pos = tuple(p for p, o in enumerate(order) if o < len(own))
    gold = tuple(p for p in own_pos if doc_ids[order[p]] in support)
    return RulerHQARecord(index=q.index, id=q.id, question=q.question, answers=q.answers, num_docs=num_docs,
                          documents=tuple(data.pool[doc_ids[o]] for o in order), gold=gold, own=own_pos)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def build_ruler_hqa(data: HotpotQA, num_docs: int, *, indices: Optional[Sequence[int]] = None,
                    seed: int = DEFAULT_SEED, shuffle_seed: Optional[int] = SHUFFLE_SEED) -> list[RulerHQARecord]:
    """RULER-HQA records with ``num_docs`` documents each, for the questions at ``indices`` (file positions; all
    questions by default), in that order. See the module docstring for the construction and its sources;
    ``seed`` drives the draws, ``shuffle_seed`` the document order (MemAgent's 4; None: per question, from the
    question's own generator).

    The documents are shared with ``data.pool`` (no copies), so a record at N = 12,800 costs a tuple of
    pointers; the context string is made on demand (``record.context``, ``to_json``).

    Raises ``ValueError`` when ``num_docs`` exceeds the pool or is below a question's own paragraph count, for an
    index out of range or repeated; ``TypeError`` for a non-integer ``num_docs``, index or seed."""
    if not isinstance(data, HotpotQA):
        raise TypeError(f"build_ruler_hqa: data must be a HotpotQA (load_hotpotqa(path)), got {type(data).__name__}")
    if not _is_int(num_docs):
        raise TypeError(f"build_ruler_hqa: num_docs must be an int, got {type(num_docs).__name__}")
    if not (_is_int(seed) and (shuffle_seed is None or _is_int(shuffle_seed))):
        raise TypeError(f"build_ruler_hqa: seeds must be ints, got seed={seed!r}, shuffle_seed={shuffle_seed!r}")
    if num_docs > len(data.pool):
        raise ValueError(f"build_ruler_hqa: num_docs={num_docs} exceeds the {len(data.pool)} unique paragraphs of "
                         "the file; pass a larger HotpotQA file or a smaller num_docs")
    if indices is None:
        indices = range(len(data.questions))
    elif isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
        raise TypeError(f"build_ruler_hqa: indices must be a sequence of ints, got {type(indices).__name__}")
    seen: set[int] = set()
    for i in indices:
        if not _is_int(i):
            raise TypeError(f"build_ruler_hqa: question index {i!r} is not an int")
        if not 0 <= i < len(data.questions):
            raise ValueError(f"build_ruler_hqa: question index {i} is out of range (the file has "
                             f"{len(data.questions)} questions)")
        if i in seen:
            raise ValueError(f"build_ruler_hqa: question index {i} is repeated")
        seen.add(i)
        own = len(data.questions[i].paragraphs)
        if num_docs < own:
            raise ValueError(f"build_ruler_hqa: num_docs={num_docs} is smaller than the {own} own paragraphs of "
                             f"question {i} (_id {data.questions[i].id!r})")
    shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
    return [_build_one(data, data.questions[i], int(num_docs), int(seed), shuffle_seed) for i in indices]


def write_ruler_hqa(path: PathLike, records: Iterable[RulerHQARecord]) -> int:
    """Write ``records`` as JSON Lines (``RulerHQARecord.to_json``, one per line) to ``path`` atomically: the file
    appears complete or not at all, and an earlier file at ``path`` survives a failure. Records are encoded one at
    a time, so a generator keeps one context in memory. Returns the number written.

    Raises ``TypeError`` for an item that is not a ``RulerHQARecord`` (nothing is written), ``FileNotFoundError``
    when the folder does not exist."""
    def rows() -> Iterator[dict[str, Any]]:
        for j, r in enumerate(records):
            if not isinstance(r, RulerHQARecord):
                raise TypeError(f"write_ruler_hqa: item {j} is a {type(r).__name__}, not a RulerHQARecord")
            yield r.to_json()

    return write_jsonl_atomic(path, rows())


def _record_from_json(where: str, line_no: int, row: Any) -> RulerHQARecord:
    def bad(msg: str) -> HotpotQAFormatError:
        return HotpotQAFormatError(f"{where}: line {line_no}: {msg}")

    if not isinstance(row, Mapping):
        raise bad(f"expected a JSON object, got {type(row).__name__}")
    for field in ("context", "input", "answers", "num_docs", "index", "_id", "gold", "own", "document_spans"):
        if field not in row:
            raise bad(f"missing field {field!r} (not a file written by write_ruler_hqa)")
    context, spans = row["context"], row["document_spans"]
    if not isinstance(context, str) or not isinstance(spans, list):
        raise bad("fields 'context' / 'document_spans' must be a string and a list")
    try:
        documents = tuple(context[s:e] for s, e in spans)
    except (TypeError, ValueError) as e:
        raise bad(f"field 'document_spans' is malformed ({e})") from e
    if len(documents) != row["num_docs"] or format_documents(documents) != (context, tuple(map(tuple, spans))):
        raise bad("'context' does not match 'document_spans' / 'num_docs' (a corrupt or edited file)")
    try:
        record = RulerHQARecord(index=int(row["index"]), id=str(row["_id"]), question=str(row["input"]),
                                answers=tuple(row["answers"]), num_docs=int(row["num_docs"]), documents=documents,
                                gold=tuple(int(p) for p in row["gold"]), own=tuple(int(p) for p in row["own"]))
    except (TypeError, ValueError) as e:
        raise bad(f"malformed field ({e})") from e
    if not set(record.gold) <= set(record.own) <= set(range(record.num_docs)):
        raise bad("'gold' must be positions among 'own', and 'own' positions among the documents")
    return record


def read_ruler_hqa(path: PathLike) -> Iterator[RulerHQARecord]:
    """Yield the records of a file written by ``write_ruler_hqa``, one line at a time (a 1.75M-token data set is
    never held whole). Raises ``HotpotQAFormatError`` naming the line for a line that is not JSON, lacks a field,
    or whose context does not match its document spans; ``FileNotFoundError`` for a missing file."""
    where = os.fspath(path)
    with open(where, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise HotpotQAFormatError(f"{where}: line {line_no}: not valid JSON ({e})") from e
            yield _record_from_json(where, line_no, row)
