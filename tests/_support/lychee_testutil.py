"""Helpers for the tests of memcomp.lychee's reasoner, gate and baselines: a scripted generation engine, a scripted
gate, coded block memories and distractor text for the synthetic task."""

import copy
import mmap
import re

import torch

from memcomp.lychee.gate import Gate
from memcomp.rl.engine import GenerationEngine, GenerationResult


def touch_fresh_pages(nbytes):
    """Map ``nbytes`` of fresh anonymous memory, write every page, unmap it: the process's RSS grows by ``nbytes``
    whatever the allocator holds in reserve (a freed heap region reused by torch.ones would not raise it)."""
    buf = mmap.mmap(-1, nbytes)
    try:
        for off in range(0, nbytes, mmap.PAGESIZE):
            buf[off] = 1
    finally:
        buf.close()


# Distractor sentences for memcomp.eval.synthetic (our own text; none mentions a person, city or country).
DISTRACTORS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "A custom key function can be supplied to customize the sort order.",
    "Open file and return a stream.",
    "Raise OSError upon failure.",
    "The file is either a text or byte string.",
    "Compressed memory lets a language model read a long context through a few dense vectors per chunk.",
    "The reader keeps a small buffer and refills it when the stream runs low.",
    "Each request carries a header that names the method and the path.",
    "A queue hands items from producers to consumers in the order they arrived.",
    "The parser stops at the first line that does not match the expected pattern.",
    "Timers fire once after a delay, or repeatedly at a fixed interval.",
    "A lock lets only one thread at a time enter the guarded section.",
    "The cache evicts the least recently used entry when it is full.",
    "Numbers are rounded half to even unless another mode is chosen.",
    "The socket is closed when the block exits, even after an error.",
    "A generator yields values one by one instead of building a list.",
    "The dictionary preserves the order in which keys were inserted.",
    "Paths are joined with the separator of the operating system.",
    "The log records the time, the level and the message of each event.",
    "A set holds each value at most once and tests membership quickly.",
    "The encoder writes the object as text that the decoder can read back.",
    "Slices copy the selected part of a sequence into a new object.",
    "The shell expands the pattern to the names of the matching files.",
    "A default argument is evaluated once, when the function is defined.",
]

_MEMORY_SLOT = re.compile(r"<memory>\n(.*?)\n</memory>", re.DOTALL)


def fresh_compressor(base_tokenizer, seed=0):
    """tests/memcomp/conftest.py's make_compressor, for module-scoped fixtures (which cannot use that function-scoped
    factory): a tiny random Qwen2 at C = 4 with a non-trivial projection."""
    from testutil import tiny_model

    from memcomp import CompressorConfig, MemoryCompressor

    tok = copy.deepcopy(base_tokenizer)
    comp = MemoryCompressor.from_base(tiny_model(tok, seed=seed), tok, CompressorConfig(chunk_size=4))
    with torch.no_grad():
        comp.projection.weight.add_(0.05 * torch.randn_like(comp.projection.weight))
        comp.projection.bias.normal_(0, 0.1)
    return comp


def coded_block(code, n_chunks, d):
    """A block's memory embeddings ``[n_chunks, d]`` whose every value is ``code``: the scripted engine and gate read
    which block a request holds from ``memory[0, 0]``."""
    return torch.full((n_chunks, d), float(code))


def block_code(memory):
    t = memory.embeddings if hasattr(memory, "embeddings") else memory
    return int(round(float(t[0, 0])))


def memory_slot(text):
    """The working memory inside a prompt's ``<memory>`` tags (the last occurrence)."""
    found = _MEMORY_SLOT.findall(text)
    assert found, f"no <memory> slot in {text!r}"
    return found[-1]


class ScriptedEngine(GenerationEngine):
    """A ``GenerationEngine`` that answers from a script and records every call.

    ``respond(request, prompt_text, options) -> str`` gives the response text; its token ids (no special tokens) plus
    EOS are returned (finish "stop"). With ``obey_limit`` (default) a response longer than ``max_new_tokens`` is cut
    there without EOS (finish "length"), as a real engine does; without it, the whole response comes back (an engine
    that overruns the limit). ``calls`` holds ``(requests, options)`` per call; ``texts`` the decoded prefix + prompt
    of each request (memory block excluded), in call order."""

    def __init__(self, tokenizer, respond, *, obey_limit=True, allocate_bytes=0):
        self.tok, self.respond, self.obey_limit, self.allocate_bytes = tokenizer, respond, obey_limit, allocate_bytes
        self.calls, self.texts = [], []

    def prompt_text(self, request):
        ids = []
        for part in (request.prefix, request.prompt):
            if part is None:
                continue
            ids += part.tolist() if isinstance(part, torch.Tensor) else list(part)
        return self.tok.decode(ids)

    def generate(self, requests, options):
        requests = self.check_call(requests, options)
        self.calls.append((requests, options))
        if self.allocate_bytes:  # a transient allocation the cost meter must see
            touch_fresh_pages(self.allocate_bytes)
        out = []
        for r in requests:
            text = self.prompt_text(r)
            self.texts.append(text)
            ids = list(self.tok(self.respond(r, text, options), add_special_tokens=False)["input_ids"])
            if self.obey_limit and len(ids) >= options.max_new_tokens:
                ids, finish = ids[: options.max_new_tokens], "length"
            else:
                ids, finish = ids + [self.tok.eos_token_id], "stop"
            shown = ids[:-1] if finish == "stop" else ids
            out.append([GenerationResult(ids, self.tok.decode(shown, skip_special_tokens=True), finish)])
        return out


def chain_respond(request, text, options, *, answer_tokens=None):
    """Updates append the block's code to the previous memory ("No previous memory b3 b7"); the final prompt
    answers ``\\boxed{<memory>}``. Updates and answers are told apart by their prompts (a final prompt has no memory
    block)."""
    memory = memory_slot(text)
    if request.memory is None:
        return f"\\boxed{{{memory}}}"
    return f"{memory} b{block_code(request.memory)}"


class ScriptedGate(Gate):
    """A real ``Gate`` (its prompts, budgets and fingerprint checks) whose scores come from ``scorer(code,
    memory_text) -> float``; ``rows`` records ``(code, problem_ids, memory_text)`` of every row scored."""

    def __init__(self, compressor, scorer, thresholds=(0.5, 0.5)):
        super().__init__(compressor)
        self.scorer, self.rows = scorer, []
        self.thresholds = {"prefilter": thresholds[0], "sequential": thresholds[1]}

    def score(self, blocks, problems, memories=None, *, batch_size=64):
        memories = memories if memories is not None else [None] * len(blocks)
        out = []
        for b, p, m in zip(blocks, problems, memories):
            mem = "" if m is None else self.compressor.tokenizer.decode(m)
            self.rows.append((block_code(b), list(p), None if m is None else mem))
            out.append(self.scorer(block_code(b), mem))
        return torch.tensor(out, dtype=torch.float32)
