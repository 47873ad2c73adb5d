"""Peak host memory of building a block store, measured per input length in a fresh process (issue 12's
streaming target: encoding 1.75M tokens with a tiny model on CPU within 10 % of the peak RSS of encoding 100K).

``measure_build_rss(num_tokens, workdir)`` writes a synthetic corpus of about ``num_tokens`` tokens to a file
(streamed: the parent never holds it either), then runs ``python -m memcomp.lychee.store_rss`` in a child process
that builds a tiny random compressor (``memcomp.model_configs`` "tiny": Qwen2, d = 128, 2 layers) with a byte-level
BPE tokenizer trained on the corpus' vocabulary, builds the store from the file (a ``pathlib.Path``: the file is
read a window at a time) and reports its own ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` before and after the
build. A fresh process per size, because a peak only ever grows within one process. Used by
``bench/bench_block_store.py`` and by the test suite (at small sizes).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

_SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"] + ["th", "ng", "st"]


def _vocabulary(rng: random.Random, n: int = 3000) -> list[str]:
    return ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def corpus_paragraphs(seed: int = 0) -> Iterator[str]:
    """An endless, deterministic stream of pseudo-English paragraphs (invented words, sentences of 5-15 words,
    digits now and then), each ending in a blank line: text whose length is set by how much is read."""
    rng = random.Random(seed)
    words = _vocabulary(rng)
    while True:
        sentences = []
        for _ in range(rng.randint(3, 8)):
            ws = [rng.choice(words) for _ in range(rng.randint(5, 15))]
            if rng.random() < 0.2:
                ws.insert(rng.randrange(len(ws)), str(rng.randint(0, 99999)))
            sentences.append(" ".join(ws).capitalize() + rng.choice(".!?;"))
        yield " ".join(sentences) + "\n\n"


def _prepare(workdir: str, seed: int) -> tuple[str, float]:
    """Train and save the tokenizer once per ``workdir``; returns its folder and the corpus' characters per token."""
    from transformers import AutoTokenizer

    from memcomp.demo.tokenizer import train_tokenizer

    tok_dir = os.path.join(workdir, "tokenizer")
    stream = corpus_paragraphs(seed)
    sample = [next(stream) for _ in range(400)]
    if not os.path.isdir(tok_dir):
        # 1,000 ids + the two MEM tokens fit the tiny model's 1,024-row embedding table.
        train_tokenizer(sample, vocab_size=1000).save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = "".join(sample)
    return tok_dir, len(text) / len(tok(text, add_special_tokens=False)["input_ids"])


def write_corpus(path: str, num_chars: int, seed: int = 0) -> int:
    """Write the first ``num_chars`` characters of ``corpus_paragraphs(seed)`` to ``path`` (UTF-8); returns the
    count written."""
    written = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        for para in corpus_paragraphs(seed):
            para = para[: num_chars - written]
            f.write(para)
            written += len(para)
            if written >= num_chars:
                return written
    return written


def measure_build_rss(num_tokens: int, workdir: str, *, block_tokens: int = 4096, shard_blocks: int = 64,
                      chunk_size: int = 4, window_chars: int = 1 << 16, seed: int = 0,
                      timeout: float = 3600.0) -> dict[str, Any]:
    """Build a block store of about ``num_tokens`` tokens in a child process and return what it measured:
    ``num_tokens`` / ``num_blocks`` (exact, from the store), ``setup_rss_mb`` (peak RSS after imports and the
    model, before the build), ``peak_rss_mb`` (peak RSS of the whole child), ``build_rss_mb`` (their difference:
    what the build added), ``seconds`` and ``tokens_per_s`` of the build. Files go under ``workdir`` (the corpus and
    the store of each size are removed afterwards; the tokenizer is kept for the next size).

    Raises ``ValueError`` for a non-positive ``num_tokens``, ``RuntimeError`` when the child fails (its stderr
    included)."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    import shutil

    os.makedirs(workdir, exist_ok=True)
    tok_dir, chars_per_token = _prepare(workdir, seed)
    corpus = os.path.join(workdir, f"corpus-{num_tokens}.txt")
    store_dir = os.path.join(workdir, f"store-{num_tokens}")
    write_corpus(corpus, int(num_tokens * chars_per_token), seed)
    args = {"tokenizer": tok_dir, "corpus": corpus, "store": store_dir, "block_tokens": block_tokens,
            "shard_blocks": shard_blocks, "chunk_size": chunk_size, "window_chars": window_chars, "seed": seed}
    try:
        out = subprocess.run([sys.executable, "-m", "memcomp.lychee.store_rss", json.dumps(args)],
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"block store build of {num_tokens} tokens failed in the child process "
                               f"(exit {out.returncode}):\n{out.stderr[-4000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if os.path.exists(corpus):
            os.remove(corpus)
        shutil.rmtree(store_dir, ignore_errors=True)
    return {"target_tokens": num_tokens, **result}


def _rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _child(args: dict[str, Any]) -> dict[str, Any]:
    import pathlib
    import time

    import torch
    from transformers import AutoTokenizer

    from memcomp.compressor import MemoryCompressor
    from memcomp.config import CompressorConfig
    from memcomp.lychee.store import BlockStore, BlockStoreConfig
    from memcomp.model_configs import random_model

    torch.manual_seed(args["seed"])
    tok = AutoTokenizer.from_pretrained(args["tokenizer"])
    comp = MemoryCompressor.from_base(random_model("tiny"), tok,
                                      CompressorConfig(chunk_size=args["chunk_size"], progress=False))
    comp.fingerprint()  # computed once here, so its cost falls in the set-up
    setup = _rss_mb()
    t0 = time.perf_counter()
    store = BlockStore.build(comp, pathlib.Path(args["corpus"]), args["store"],
                             BlockStoreConfig(block_tokens=args["block_tokens"], shard_blocks=args["shard_blocks"],
                                              window_chars=args["window_chars"]), progress=False, overwrite=True)
    seconds = time.perf_counter() - t0
    peak = _rss_mb()
    return {"num_tokens": store.num_tokens, "num_blocks": len(store), "setup_rss_mb": setup, "peak_rss_mb": peak,
            "build_rss_mb": peak - setup, "seconds": seconds, "tokens_per_s": store.num_tokens / seconds}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
