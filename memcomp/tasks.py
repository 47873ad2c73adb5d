"""Training samples for the compression tasks (seed 002, Table 1) and plain language modelling.

Each builder turns token ids into a ``Sample``: the context to compress, the decoder tokens around the
memory block, and the target. Decoder layout of one sample:

    before + [memory block] + after + target (+ end)          labels only on target (+ end)

Formats: "flat" (CPT stage 1: the memory, the instruction on its own line, then the target) and "chatml"
(stages 2-3: system and user turns around the memory and instruction, the target as the assistant turn;
``boxed=True`` adds the RL instruction to put the final answer in \\boxed{}). Bridge chunks (continuation)
are uncompressed tokens placed right before the target, without labels.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TASKS = ("reconstruction", "continuation", "summarization", "qa", "lm")
# Tasks whose samples have no memory block: plain LM, and the raw-text calls of the LycheeMemory systems' SFT
# (memcomp.lychee.traces: MemAgent's update, the final answer, full context).
PLAIN_TEXT_TASKS = ("lm", "memagent_update", "final_answer", "full_context")
FORMATS = ("flat", "chatml")

# Our own wording, several phrasings per task and length (the paper samples from pools of 5-8). The first
# SHORT of each pool are the short ones.
SHORT = 3
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "reconstruction": (
        "Restore the text held in memory.",
        "Write the memorised text back out.",
        "Reproduce the compressed passage.",
        "Recover the original passage from the compressed memory above.",
        "Spell out, word for word, the text that the memory above encodes.",
        "The memory above holds a passage in compressed form. Write that passage out again exactly, "
        "keeping every word in its original order.",
    ),
    "continuation": (
        "Keep writing.",
        "Carry on from here.",
        "Continue the text.",
        "Pick up where the compressed text above leaves off.",
        "Using the memory above as context, write what comes next.",
        "The memory above holds the beginning of a document. Continue it naturally from the point where it "
        "stops, in the same voice and style.",
    ),
    "summarization": (
        "Summarise it.",
        "Give a short summary.",
        "State the gist briefly.",
        "Summarise the passage held in memory in a few sentences.",
        "Write a brief summary of the compressed text above.",
        "Read the passage stored in the memory above and write a concise summary of its central point in "
        "your own words.",
    ),
}
SYSTEM_PROMPT = "You are a helpful assistant that reads compressed memory and answers from it."
BOXED_INSTRUCTION = " Reason step by step, then give the final answer in \\boxed{}."


@dataclass
class Sample:
    """Token ids of one training sample (see the module docstring for the layout)."""

    task: str
    context: list[int]
    before: list[int]
    after: list[int]
    target: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_memory(self) -> bool:
        return self.task not in PLAIN_TEXT_TASKS


def _as_ids(task: str, name: str, ids: Any) -> list[int]:
    """Samples hold token ids (a list of ints, or anything with ``tolist()`` such as a 1-D integer tensor). A str
    (split into characters by list()) or floats would pass silently and fail far later, in the collator."""
    if isinstance(ids, str):
        raise TypeError(f"a {task} sample's {name} must be token ids (a list of ints), got a str; tokenize it "
                        f"first, e.g. tokenizer(text, add_special_tokens=False)['input_ids']")
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    bad = next((v for v in ids if isinstance(v, bool) or not isinstance(v, numbers.Integral)), None)
    if bad is not None:
        raise TypeError(f"a {task} sample's {name} must be token ids (ints), got {type(bad).__name__} {bad!r}")
    return ids


class SampleBuilder:
    """Builds samples with one tokenizer, prompt format and chunk size (bridge chunks are chunk-sized)."""

    def __init__(self, tokenizer: Any, fmt: str = "flat", boxed: bool = False, chunk_size: int = 16,
                 end_token: str | None = None, instructions: str = "all") -> None:
        """``instructions``: "all" phrasings (the paper's pools of several lengths) or only the "short" ones."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown prompt format {fmt!r}; choose one of {FORMATS}")
        if instructions not in ("all", "short"):
            raise ValueError(f"instructions must be 'all' or 'short', got {instructions!r}")
        self.pool_size = SHORT if instructions == "short" else None
        self.tok, self.fmt, self.boxed, self.chunk_size = tokenizer, fmt, boxed, chunk_size
        if end_token is None:
            end_token = "<|im_end|>" if fmt == "chatml" else None
        self.end = self._ids(end_token) if end_token else ([tokenizer.eos_token_id]
                                                           if tokenizer.eos_token_id is not None else [])

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def prompt(self, instruction: str) -> tuple[list[int], list[int]]:
        """The decoder prompt around the memory, as training builds it: ``(before, after)`` token ids, so that
        ``comp.generate(memory, after, prefixes=[before])`` asks a trained compressor for the task, e.g.
        ``prompt(INSTRUCTIONS["reconstruction"][0])`` to read a passage back out. ``before`` is empty in the
        flat format and holds the ChatML system and user headers in "chatml"; ``after`` holds the instruction
        (plus the \\boxed{} request when ``boxed``) and, in ChatML, the assistant header."""
        if not isinstance(instruction, str) or not instruction:
            raise ValueError("prompt: the instruction must be a non-empty string")
        return self._wrap(instruction)

    def _wrap(self, instruction: str) -> tuple[list[int], list[int]]:
        if self.boxed:
            instruction += BOXED_INSTRUCTION
        if self.fmt == "flat":
            return [], self._ids("\n" + instruction + "\n")
        before = self._ids(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
        after = self._ids(f"\n{instruction}<|im_end|>\n<|im_start|>assistant\n")
        return before, after

    def _sample(self, task, context, instruction, target, bridge=(), **meta) -> Sample:
        context, target, bridge = (_as_ids(task, name, ids) for name, ids in
                                   (("context", context), ("target", target), ("bridge", bridge)))
        if not isinstance(instruction, str):
            raise TypeError(f"a {task} sample's instruction or question is a str, got {type(instruction).__name__}")
        if task != "lm" and not context:
            raise ValueError(f"a {task} sample needs a non-empty context (only plain LM samples have no memory)")
        if not target:
            raise ValueError(f"a {task} sample needs a non-empty target")
        before, after = self._wrap(instruction) if task != "lm" else ([], [])
        return Sample(task, list(context), before, after + list(bridge), list(target) + self.end, meta)

    def _pick(self, task: str, rng: random.Random) -> str:
        if not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random (e.g. random.Random(0)), got {type(rng).__name__}")
        return rng.choice(INSTRUCTIONS[task][: self.pool_size])

    # -- the tasks -------------------------------------------------------------------------------------

    def reconstruction(self, doc: Sequence[int], rng: random.Random) -> Sample:
        return self._sample("reconstruction", doc, self._pick("reconstruction", rng), doc)

    def continuation(self, doc: Sequence[int], rng: random.Random, n_bridge: int = 1,
                     split: float | None = None) -> Sample:
        """Memory of the first part (a whole number of chunks), ``n_bridge`` uncompressed chunks, target =
        the rest. ``split``: fraction of the document compressed (default: uniform in [0.3, 0.7])."""
        C = self.chunk_size
        if n_bridge < 0:
            raise ValueError(f"n_bridge must be >= 0, got {n_bridge}")
        split = rng.uniform(0.3, 0.7) if split is None else split
        cut = max(C, int(len(doc) * split) // C * C)
        rest = len(doc) - cut - n_bridge * C
        if rest < 1:
            raise ValueError(f"a document of {len(doc)} tokens is too short for continuation with {n_bridge} "
                             f"bridge chunks of {C} (needs > {cut + n_bridge * C})")
        bridge = doc[cut:cut + n_bridge * C]
        return self._sample("continuation", doc[:cut], self._pick("continuation", rng),
                            doc[cut + n_bridge * C:], bridge, n_bridge=n_bridge)

    def summarization(self, doc: Sequence[int], summary: Sequence[int], rng: random.Random) -> Sample:
        return self._sample("summarization", doc, self._pick("summarization", rng), summary)

    def qa(self, context: Sequence[int], question: str, answer: Sequence[int]) -> Sample:
        return self._sample("qa", context, question, answer)

    def lm(self, text: Sequence[int]) -> Sample:
        text = _as_ids("lm", "text", text)
        if not text:
            raise ValueError("an lm sample needs a non-empty text")
        return Sample("lm", [], [], [], text, {})
