"""A synthetic multi-hop QA task the project generates itself, with gold evidence labels and ideal memory traces.

Each example invents its entities (pronounceable random names: a person, a city, a country), states one or two
facts as documents of their own, and hides them among distractor paragraphs taken from any local text the caller
passes (e.g. ``memcomp.demo.corpus.stdlib_passages()["train"]``):

- ``hops=2``: "X was born in CITY." + "CITY is in COUNTRY." -> "In which country was X born?" -> COUNTRY;
- ``hops=1``: "X was born in CITY." -> "In which city was X born?" -> CITY.

Confusers (``num_confusers``) are facts of the same two forms about other invented people, cities and countries:
they are not evidence, so neither a gate nor a reasoner can solve the task by spotting the fact template. Every
invented name is checked not to occur as a word in the chosen distractors and not to contain or be contained in
another name of the example, so the answer is stated only by the evidence and ``sub_em`` cannot be satisfied by a
neighbouring name. The documents are shuffled and formatted like RULER-HQA (``"Document i:"``, a blank line
between), so one reasoner prompt serves both.

Difficulty knobs (``SyntheticConfig``): ``hops`` (1 or 2), ``num_distractors`` and ``target_tokens`` (length),
``num_confusers``. Everything is drawn from ``random.Random`` seeded per example from ``seed`` and the example's
number: the same arguments give the same examples on every machine.

For the gate and the reasoner: ``example_blocks`` cuts the tokenised context into blocks of B tokens labelled
related when they overlap an evidence document (``memcomp.eval.documents.label_blocks``), and ``memory_trace``
writes the ideal working memory after each block read in a given order -- the evidence sentences found so far,
starting from MemAgent's "No previous memory" -- and the final ``\\boxed{}`` answer once every fact has been read:
the targets of a reasoner SFT stage.
"""

from __future__ import annotations

import numbers
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from memcomp.eval._io import PathLike, write_jsonl_atomic
from memcomp.eval.documents import (
    DOCUMENT_SEPARATOR,
    DOCUMENT_TEMPLATE,
    Blocks,
    Span,
    format_documents,
    label_blocks,
    tokenize_with_offsets,
)

__all__ = ["NO_MEMORY", "SyntheticConfig", "SyntheticExample", "generate_example", "generate_dataset",
           "write_synthetic", "example_blocks", "MemoryTrace", "memory_trace"]

# MemAgent's initial working memory (NO_MEMORY in taskutils/memory_eval/utils/recurrent*.py).
NO_MEMORY = "No previous memory"

_BORN = ("{person} was born in {city}.", "{person} was born in the city of {city}.",
         "The birthplace of {person} is {city}.")
_LOCATED = ("{city} is in {country}.", "{city} is a city in {country}.", "{city} lies in {country}.")
_QUESTION = {1: "In which city was {person} born?", 2: "In which country was {person} born?"}

# Pronounceable names: (onset, vowel, optional coda) syllables.
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st",
           "tr", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")
_CITY_SUFFIXES = ("", "", "ton", "burg", "ford", "vale", "port")
_COUNTRY_SUFFIXES = ("ia", "land", "stan", "ora")


@dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty of the synthetic task.

    - ``hops``: 1 (the city of birth) or 2 (the country of the city of birth).
    - ``num_distractors``: distractor paragraphs per example (at least this many when ``target_tokens`` is set).
    - ``target_tokens``: when set, distractors are added until the documents, each counted with a
      "Document i:" header and separator, reach this many tokens under the tokenizer passed to the generator (the
      sum of per-document counts: the context's own token count differs by a few tokens at the joins).
    - ``num_confusers``: same-form facts about other invented entities (not evidence).
    """

    hops: int = 2
    num_distractors: int = 8
    target_tokens: Optional[int] = None
    num_confusers: int = 2

    def __post_init__(self) -> None:
        for name in ("hops", "num_distractors", "num_confusers"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise TypeError(f"SyntheticConfig.{name} must be an int, got {v!r}")
        if self.hops not in (1, 2):
            raise ValueError(f"SyntheticConfig.hops must be 1 or 2, got {self.hops}")
        if self.num_distractors < 0 or self.num_confusers < 0:
            raise ValueError(f"SyntheticConfig: num_distractors and num_confusers must be >= 0, got "
                             f"{self.num_distractors}, {self.num_confusers}")
        if self.target_tokens is not None and (not isinstance(self.target_tokens, numbers.Integral)
                                               or isinstance(self.target_tokens, bool) or self.target_tokens < 1):
            raise ValueError(f"SyntheticConfig.target_tokens must be None or an int >= 1, got {self.target_tokens!r}")


@dataclass(frozen=True)
class SyntheticExample:
    """One example: the question, its answer, the shuffled ``documents``, ``evidence`` (the positions of the
    evidence documents in hop order: the birth fact, then for two hops the location fact) and ``facts`` (their
    sentences: ``documents[evidence[j]] == facts[j]``). ``seed`` is the seed the example was drawn from."""

    question: str
    answer: str
    documents: tuple[str, ...]
    evidence: tuple[int, ...]
    facts: tuple[str, ...]
    hops: int
    seed: int

    def format(self) -> tuple[str, tuple[Span, ...]]:
        """``(context, spans)``: the "Document i:" text and each document's character span in it."""
        return format_documents(self.documents)

    @property
    def context(self) -> str:
        return self.format()[0]

    def evidence_spans(self) -> tuple[Span, ...]:
        """The character spans of the evidence documents in ``context``, in hop order."""
        spans = self.format()[1]
        return tuple(spans[p] for p in self.evidence)

    def to_json(self) -> dict[str, Any]:
        return {"question": self.question, "answers": [self.answer], "context": self.context,
                "documents": list(self.documents), "evidence": list(self.evidence), "facts": list(self.facts),
                "hops": self.hops, "seed": self.seed}


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


class _Names:
    """Fresh names for one example: no word of one equals, contains or is contained in a word of another
    (case-insensitive), so no name can match another by sub-string."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.words: list[str] = []  # lower case

    def _fresh(self, make) -> str:
        while True:
            name = make()
            new = name.lower().split()
            if all(w not in u and u not in w for w in new for u in self.words) and len(set(new)) == len(new):
                self.words += new
                return name

    def person(self) -> str:
        rng = self.rng
        return self._fresh(lambda: f"{_word(rng, 2).capitalize()} {_word(rng, rng.choice((2, 3))).capitalize()}")

    def city(self) -> str:
        rng = self.rng
        return self._fresh(lambda: (_word(rng, rng.choice((2, 3))) + rng.choice(_CITY_SUFFIXES)).capitalize())

    def country(self) -> str:
        rng = self.rng
        return self._fresh(lambda: (_word(rng, 2) + rng.choice(_COUNTRY_SUFFIXES)).capitalize())


def _check_distractors(distractors: Sequence[str]) -> None:
    if isinstance(distractors, str) or not isinstance(distractors, Sequence):
        raise TypeError(f"distractors must be a sequence of str (paragraphs), got {type(distractors).__name__}")
    for j, d in enumerate(distractors):
        if not isinstance(d, str) or not d.strip():
            raise ValueError(f"distractor {j} must be a non-empty string, got {d!r}")


def _permutation(rng: random.Random, n: int) -> Iterator[int]:
    """A lazy uniform permutation of range(n) (Fisher-Yates, one swap per element drawn)."""
    perm = list(range(n))
    for j in range(n):
        k = rng.randrange(j, n)
        perm[j], perm[k] = perm[k], perm[j]
        yield perm[j]


def _num_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenize_with_offsets(tokenizer, text)[0])


def generate_example(distractors: Sequence[str], config: SyntheticConfig = SyntheticConfig(), *, seed: int,
                     tokenizer: Any = None) -> SyntheticExample:
    """One example drawn from ``random.Random(seed)`` (see the module docstring). ``distractors`` are candidate
    paragraphs (drawn without replacement; one that mentions an invented name as a word is skipped);
    ``tokenizer`` (a Hugging Face fast tokenizer) is needed only with ``config.target_tokens``.

    Raises ``ValueError`` when there are not enough usable distractors for ``num_distractors`` or
    ``target_tokens``, when ``target_tokens`` is set without a tokenizer, or for an empty distractor;
    ``TypeError`` for a non-integer seed or a bare str of distractors."""
    if not isinstance(config, SyntheticConfig):
        raise TypeError(f"generate_example: config must be a SyntheticConfig, got {type(config).__name__}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"generate_example: seed must be an int, got {seed!r}")
    _check_distractors(distractors)
    if config.target_tokens is not None and tokenizer is None:
        raise ValueError("generate_example: config.target_tokens counts tokens, so pass the tokenizer")
    rng = random.Random(f"memcomp.synthetic:{int(seed)}")
    names = _Names(rng)

    person, city = names.person(), names.city()
    facts = [rng.choice(_BORN).format(person=person, city=city)]
    answer = city
    if config.hops == 2:
        answer = names.country()
        facts.append(rng.choice(_LOCATED).format(city=city, country=answer))
    confusers = []
    for _ in range(config.num_confusers):
        if rng.random() < 0.5:
            confusers.append(rng.choice(_BORN).format(person=names.person(), city=names.city()))
        else:
            confusers.append(rng.choice(_LOCATED).format(city=names.city(), country=names.country()))

    mentions = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in names.words) + r")\b", re.IGNORECASE)
    header = DOCUMENT_SEPARATOR + DOCUMENT_TEMPLATE.format(i=0, document="")
    budget = None
    if config.target_tokens is not None:
        header_tokens = _num_tokens(tokenizer, header)
        budget = config.target_tokens - sum(_num_tokens(tokenizer, d) + header_tokens for d in facts + confusers)
    chosen: list[str] = []
    for j in _permutation(rng, len(distractors)):
        if len(chosen) >= config.num_distractors and (budget is None or budget <= 0):
            break
        if mentions.search(distractors[j]):
            continue
        chosen.append(distractors[j])
        if budget is not None:
            budget -= _num_tokens(tokenizer, distractors[j]) + header_tokens
    if len(chosen) < config.num_distractors or (budget is not None and budget > 0):
        want = f"{config.num_distractors} distractors" + (
            f" and {config.target_tokens} tokens" if config.target_tokens is not None else "")
        raise ValueError(f"generate_example: {len(distractors)} distractor paragraphs are not enough for {want} "
                         f"(got {len(chosen)} usable): pass more text or ask for less")

    documents = facts + confusers + chosen
    order = list(range(len(documents)))
    rng.shuffle(order)
    position = {o: p for p, o in enumerate(order)}
    return SyntheticExample(question=_QUESTION[config.hops].format(person=person), answer=answer,
                            documents=tuple(documents[o] for o in order),
                            evidence=tuple(position[j] for j in range(len(facts))), facts=tuple(facts),
                            hops=config.hops, seed=int(seed))


def generate_dataset(distractors: Sequence[str], num_examples: int, config: SyntheticConfig = SyntheticConfig(), *,
                     seed: int = 0, tokenizer: Any = None) -> list[SyntheticExample]:
    """``num_examples`` examples; example i is ``generate_example(..., seed=seed * 1_000_003 + i)``, so a data set
    with more examples extends, never reshuffles, a smaller one with the same seed. Raises as
    ``generate_example``, and ``ValueError`` for ``num_examples`` < 1."""
    if not isinstance(num_examples, numbers.Integral) or isinstance(num_examples, bool) or num_examples < 1:
        raise ValueError(f"generate_dataset: num_examples must be an int >= 1, got {num_examples!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"generate_dataset: seed must be an int, got {seed!r}")
    return [generate_example(distractors, config, seed=int(seed) * 1_000_003 + i, tokenizer=tokenizer)
            for i in range(num_examples)]


def write_synthetic(path: PathLike, examples: Iterable[SyntheticExample]) -> int:
    """Write ``examples`` as JSON Lines (``SyntheticExample.to_json``) to ``path`` atomically (complete or not at
    all; an earlier file survives a failure). Returns the number written. Raises ``TypeError`` for an item that is
    not a ``SyntheticExample`` (nothing is written), ``FileNotFoundError`` when the folder does not exist."""
    def rows() -> Iterator[dict[str, Any]]:
        for j, ex in enumerate(examples):
            if not isinstance(ex, SyntheticExample):
                raise TypeError(f"write_synthetic: item {j} is a {type(ex).__name__}, not a SyntheticExample")
            yield ex.to_json()

    return write_jsonl_atomic(path, rows())


def example_blocks(example: SyntheticExample, tokenizer: Any, block_size: int) -> Blocks:
    """The example's context tokenised and cut into blocks of ``block_size`` tokens, each labelled related when it
    overlaps an evidence document; ``evidence_blocks[j]`` are the blocks holding ``example.facts[j]``. Raises as
    ``memcomp.eval.documents.label_blocks``."""
    if not isinstance(example, SyntheticExample):
        raise TypeError(f"example_blocks: expected a SyntheticExample, got {type(example).__name__}")
    context, spans = example.format()
    return label_blocks(context, [spans[p] for p in example.evidence], tokenizer, block_size)


@dataclass(frozen=True)
class MemoryTrace:
    """The ideal working memory along a reading order.

    - ``block_order``: the blocks read, in order.
    - ``memories[s]``: the working memory after reading ``block_order[s]``: the facts found so far joined by a
      space, in the order they were found (hop order within one step), or the empty-memory text.
    - ``found[s]``: the indices into ``example.facts`` known after step s, in that same order.
    - ``final_answer``: ``"\\boxed{<answer>}"`` when every fact was found, else None (the answer is not derivable
      from what was read, so there is no ideal answer to imitate).
    """

    block_order: tuple[int, ...]
    memories: tuple[str, ...]
    found: tuple[tuple[int, ...], ...]
    final_answer: Optional[str]


def memory_trace(example: SyntheticExample, blocks: Blocks, block_order: Sequence[int], *,
                 empty_memory: str = NO_MEMORY) -> MemoryTrace:
    """The ideal working memory after each block of ``block_order`` (block indices of ``blocks``, which must be
    ``example_blocks(example, ...)``). A fact counts as found once every block overlapping it has been read (a
    fact straddling two blocks is whole only after both); a block without evidence leaves the memory unchanged.

    Raises ``ValueError`` when ``blocks`` does not belong to the example (its evidence count differs), or for a
    block index that is out of range or repeated; ``TypeError`` for a non-integer index."""
    if not isinstance(example, SyntheticExample) or not isinstance(blocks, Blocks):
        raise TypeError("memory_trace: expected a SyntheticExample and its Blocks (example_blocks(example, ...))")
    if len(blocks.evidence_blocks) != len(example.facts):
        raise ValueError(f"memory_trace: the blocks hold {len(blocks.evidence_blocks)} evidence spans but the example "
                         f"has {len(example.facts)} facts: pass example_blocks(example, tokenizer, block_size)")
    if isinstance(block_order, (str, bytes)) or not isinstance(block_order, Sequence):
        raise TypeError(f"memory_trace: block_order must be a sequence of block indices, got "
                        f"{type(block_order).__name__}")
    if not isinstance(empty_memory, str):
        raise TypeError(f"memory_trace: empty_memory must be a str, got {type(empty_memory).__name__}")
    read: set[int] = set()
    known: list[int] = []
    memories, found = [], []
    for k in block_order:
        if not isinstance(k, numbers.Integral) or isinstance(k, bool):
            raise TypeError(f"memory_trace: block index {k!r} is not an int")
        if not 0 <= k < blocks.num_blocks:
            raise ValueError(f"memory_trace: block {k} is out of range ({blocks.num_blocks} blocks)")
        if k in read:
            raise ValueError(f"memory_trace: block {k} is read twice")
        read.add(int(k))
        known += [j for j, ev in enumerate(blocks.evidence_blocks) if j not in known and read.issuperset(ev)]
        memories.append(" ".join(example.facts[j] for j in known) if known else empty_memory)
        found.append(tuple(known))
    complete = len(known) == len(example.facts)
    return MemoryTrace(block_order=tuple(int(k) for k in block_order), memories=tuple(memories), found=tuple(found),
                       final_answer=f"\\boxed{{{example.answer}}}" if complete else None)
