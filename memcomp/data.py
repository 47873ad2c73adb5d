"""Training data: streaming JSONL readers, the paper's task mixtures, and a resumable sample stream.

Files: ``{"text": ...}`` (documents: reconstruction, continuation, plain LM), ``{"context", "question",
"answer"}`` (QA), ``{"text", "summary"}`` (summarization). Lines are read one at a time; a malformed line
(bad JSON, a missing or non-string field) is counted and reported, never dropped silently, and the run fails
once more than ``max_bad_fraction`` of the lines read are malformed (after at least 20 lines).

Mixtures (seed 002, section 3.3.1): phase 1 = compression : plain LM 70 : 30, compression split
reconstruction : continuation 50 : 50, one bridge chunk; phase 2 = compression : LM 60 : 40, compression
split continuation 40 %, QA 27.5 %, summarization 17.5 %, reconstruction 15 %, 0-4 bridge chunks.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

from memcomp.tasks import Sample, SampleBuilder

SCHEMAS = {"text": ("text",), "qa": ("context", "question", "answer"), "summary": ("text", "summary"),
           # Reasoner SFT records (memcomp.lychee.traces): the kind's own fields are checked there.
           "trace": ("kind", "problem", "target")}


class DataError(ValueError):
    """Bad training data: a missing file, or too many malformed lines."""


def _record_check(schema: str) -> Optional[Callable[[dict[str, Any]], Optional[str]]]:
    """A schema's checks beyond its string fields: ``rec -> None`` or why the record is malformed."""
    if schema == "trace":
        from memcomp.lychee.traces import check_trace_record  # its kind-specific fields

        return check_trace_record
    return None


class JsonlReader:
    """Streams records of one schema from a JSONL file, epoch after epoch. With ``shuffle`` (the default)
    each epoch visits the lines in a seeded random order: one streaming pass records every line's byte
    offset (8 bytes a line), and records are read lazily by seeking, so the file is never loaded. Training
    on file order would give batches from one region of the corpus at a time. ``position`` (epoch, index,
    counts) is saved in checkpoints and restored with ``seek``."""

    def __init__(self, path: str, schema: str, max_bad_fraction: float = 0.01, shuffle: bool = True,
                 seed: int = 0) -> None:
        if schema not in SCHEMAS:
            raise ValueError(f"unknown data schema {schema!r}; choose one of {', '.join(SCHEMAS)}")
        if not os.path.isfile(path):
            raise DataError(f"data file not found: {path}")
        self.path, self.schema, self.fields, self.max_bad_fraction = path, schema, SCHEMAS[schema], max_bad_fraction
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.index, self.good, self.bad = 0, 0, 0, 0
        self.bad_examples: list[str] = []
        self._offsets: list[int] | None = None
        self._record_check = _record_check(schema)

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "good": self.good, "bad": self.bad}

    def seek(self, position: dict[str, int]) -> None:
        self.epoch, self.index, self.good, self.bad = (position["epoch"], position["index"], position["good"],
                                                       position["bad"])

    def _line_offsets(self) -> list[int]:
        if self._offsets is None:
            offsets, pos = [], 0
            with open(self.path, "rb") as f:
                for line in f:
                    if line.strip():
                        offsets.append(pos)
                    pos += len(line)
            if not offsets:
                raise DataError(f"{self.path} is empty")
            self._offsets = offsets
        return self._offsets

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self._line_offsets())))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _check(self, line: str, lineno: int) -> Optional[dict[str, Any]]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            return self._reject(f"line {lineno}: not JSON ({exc.msg})")
        if not isinstance(rec, dict):
            return self._reject(f"line {lineno}: not a JSON object")
        missing = [f for f in self.fields if not isinstance(rec.get(f), str) or not rec.get(f)]
        if missing:
            return self._reject(f"line {lineno}: missing or empty string field(s) {missing}")
        why = self._record_check(rec) if self._record_check is not None else None
        if why is not None:
            return self._reject(f"line {lineno}: {why}")
        self.good += 1
        return rec

    def _reject(self, why: str) -> None:
        self.bad += 1
        if len(self.bad_examples) < 5:
            self.bad_examples.append(why)
        seen = self.good + self.bad
        if seen >= 20 and self.bad / seen > self.max_bad_fraction:
            raise DataError(f"{self.path}: {self.bad} of {seen} lines malformed (> {self.max_bad_fraction:.1%}); "
                            f"first: {'; '.join(self.bad_examples)}")
        return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        offsets = self._line_offsets()
        with open(self.path, "rb") as f:
            while True:
                order = self._order(self.epoch)
                yielded = False
                while self.index < len(order):
                    line_no = order[self.index]
                    f.seek(offsets[line_no])
                    rec = self._check(f.readline().decode("utf-8", errors="replace"), line_no + 1)
                    self.index += 1
                    if rec is not None:
                        yielded = True
                        yield rec
                if not yielded and self.good == 0:
                    raise DataError(f"{self.path} has no valid {self.schema} records")
                self.epoch, self.index = self.epoch + 1, 0

    def report(self) -> str:
        return f"{os.path.basename(self.path)}: {self.good} good, {self.bad} malformed lines"


@dataclass(frozen=True)
class TaskMixture:
    """``compression`` share of samples (the rest plain LM), its split over tasks, and the bridge counts."""

    compression: float
    tasks: tuple[tuple[str, float], ...]
    bridges: tuple[int, ...]

    def __post_init__(self) -> None:
        total = sum(w for _, w in self.tasks)
        if abs(total - 1.0) > 1e-6 or not 0.0 <= self.compression <= 1.0:
            raise ValueError(f"task weights must sum to 1 and compression be in [0, 1], got {self.tasks}, "
                             f"{self.compression}")

    def draw(self, rng: random.Random) -> str:
        if rng.random() >= self.compression:
            return "lm"
        r, acc = rng.random(), 0.0
        for task, w in self.tasks:
            acc += w
            if r < acc:
                return task
        return self.tasks[-1][0]

    def expected(self) -> dict[str, float]:
        out = {t: self.compression * w for t, w in self.tasks}
        out["lm"] = 1.0 - self.compression
        return out


PHASE_1 = TaskMixture(0.7, (("reconstruction", 0.5), ("continuation", 0.5)), bridges=(1,))
PHASE_2 = TaskMixture(0.6, (("continuation", 0.40), ("qa", 0.275), ("summarization", 0.175),
                            ("reconstruction", 0.15)), bridges=(0, 1, 2, 3, 4))
SFT = TaskMixture(1.0, (("qa", 1.0),), bridges=(0,))
# The CPU demo's: phase 1's compression : LM ratio with reconstruction as the only compression task. A
# 3.5M-parameter model given the phase-1 mix (half continuation, which the LM prior plus a bridge chunk
# mostly solves) did not learn to read memory within the demo's 1,800 steps (measured: reconstruction loss
# equal to plain-LM loss); with reconstruction alone it does.
RECONSTRUCTION_LM = TaskMixture(0.7, (("reconstruction", 1.0),), bridges=(1,))
# LycheeMemory's reasoner SFT (memcomp.lychee.traces): every record of the trace file, as written.
REASONER = TaskMixture(1.0, (("trace", 1.0),), bridges=(0,))
MIXTURES = {"cpt1": PHASE_1, "cpt2": PHASE_2, "sft": SFT, "reconstruction_lm": RECONSTRUCTION_LM,
            "reasoner": REASONER}


@dataclass
class SampleStream:
    """Draws samples by the mixture from the readers: documents as random ``doc_tokens`` windows, QA
    contexts and summarization texts from their start; ``state()`` / ``restore()`` make it resumable."""

    builder: SampleBuilder
    mixture: TaskMixture
    readers: dict[str, JsonlReader]
    seed: int
    doc_tokens: int = 512
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        needs = {"reconstruction": "text", "continuation": "text", "lm": "text", "qa": "qa",
                 "summarization": "summary", "trace": "trace"}
        for task in [t for t, _ in self.mixture.tasks] + (["lm"] if self.mixture.compression < 1 else []):
            if needs[task] not in self.readers:
                raise DataError(f"the {task} task needs a {needs[task]!r} data file ({SCHEMAS[needs[task]]})")
        self._iters = {k: iter(r) for k, r in self.readers.items()}
        self._trace_prompts = None  # (Prompts, turn-end ids), built on the first trace record

    def _ids(self, text: str) -> list[int]:
        return list(self.builder.tok(text, add_special_tokens=False)["input_ids"])[: self.doc_tokens]

    def _window(self, text: str) -> list[int]:
        """A random ``doc_tokens`` window of a document (its start would recur identically every epoch and
        let the model reproduce it from its weights instead of reading the memory)."""
        ids = list(self.builder.tok(text, add_special_tokens=False)["input_ids"])
        if len(ids) <= self.doc_tokens:
            return ids
        start = self.rng.randrange(len(ids) - self.doc_tokens + 1)
        return ids[start:start + self.doc_tokens]

    def next(self) -> Sample:
        while True:
            task = self.mixture.draw(self.rng)
            if task in ("reconstruction", "continuation", "lm"):
                doc = self._window(next(self._iters["text"])["text"])
                if task == "lm":
                    if len(doc) >= 2:
                        return self.builder.lm(doc)
                elif task == "reconstruction":
                    return self.builder.reconstruction(doc, self.rng)
                else:
                    n_bridge = self.rng.choice(self.mixture.bridges)
                    if len(doc) > self.builder.chunk_size * (n_bridge + 2):
                        return self.builder.continuation(doc, self.rng, n_bridge=n_bridge)
            elif task == "trace":
                return self._trace(next(self._iters["trace"]))
            elif task == "qa":
                rec = next(self._iters["qa"])
                return self.builder.qa(self._ids(rec["context"]), rec["question"], self._ids(rec["answer"]))
            else:
                rec = next(self._iters["summary"])
                return self.builder.summarization(self._ids(rec["text"]), self._ids(rec["summary"]), self.rng)

    def _trace(self, rec: dict[str, Any]) -> Sample:
        from memcomp.lychee.prompts import Prompts
        from memcomp.lychee.traces import trace_sample, turn_end_ids

        if self._trace_prompts is None:
            self._trace_prompts = (Prompts(self.builder.tok), turn_end_ids(self.builder.tok))
        return trace_sample(rec, *self._trace_prompts)

    def take(self, n: int) -> list[Sample]:
        return [self.next() for _ in range(n)]

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "readers": {k: r.position for k, r in self.readers.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        rng_state = state["rng"]
        self.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
        for k, pos in state["readers"].items():
            self.readers[k].seek(pos)
        self._iters = {k: iter(r) for k, r in self.readers.items()}
