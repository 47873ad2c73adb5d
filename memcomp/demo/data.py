"""The demo's data: Python standard-library docstrings as JSONL (train / held out), synthetic QA made from them,
and, for the tiny model, a byte-level BPE tokenizer. The demo recipes of ``memcomp.trainers`` (``tiny_cpu``,
``smollm2``) call ``prepare_demo_data`` when training starts."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any

# Marks a data folder as the demo's own (its files may be rewritten); a folder without it is never written into.
MARKER = ".memcomp-demo-data"


def demo_data_dir(out_dir: str) -> str:
    """Where a demo run's data live: ``out_dir/../data`` (shared by the CPT, SFT and RL stages)."""
    return os.path.join(os.path.dirname(os.path.abspath(out_dir)), "data")


def prepare_demo_data(cfg: Any) -> Any:
    """Write the demo data under ``demo_data_dir(cfg.run.out_dir)`` once (reused when present; never into a folder
    holding files it did not write: ``FileExistsError``, nothing changed) and return ``cfg``
    with its empty data paths (and, for the tiny model, ``compressor.tokenizer_dir``) pointing at them. ``cfg``:
    a trainer config (``memcomp.trainers.config``: sections ``compressor``, ``data``, ``run``)."""
    from memcomp.demo.corpus import stdlib_passages
    from memcomp.demo.tokenizer import train_tokenizer

    data = demo_data_dir(cfg.run.out_dir)
    os.makedirs(data, exist_ok=True)
    paths = {k: os.path.join(data, f"{k}.jsonl") for k in ("train", "heldout", "qa_train", "qa_heldout")}
    c = cfg.compressor
    tokenizer_dir = "" if c.model_dir else os.path.join(data, "tokenizer")
    complete = all(os.path.isfile(p) for p in paths.values()) and not (tokenizer_dir and not os.path.isdir(
        tokenizer_dir))
    marker = os.path.join(data, MARKER)
    if not complete and not os.path.isfile(marker):
        # A folder memcomp did not write: never overwrite what a user keeps beside out_dir.
        theirs = sorted(os.path.basename(p) for p in [*paths.values(), tokenizer_dir] if p and os.path.exists(p))
        if theirs:
            raise FileExistsError(
                f"{data} holds {', '.join(theirs)}, which the demo data did not write; the demo recipes keep their "
                f"corpus in <out_dir>/../data: choose another out_dir= (nothing was changed)")
    if not complete:
        with open(marker, "w", encoding="utf-8") as f:
            f.write("Written by memcomp.demo.data.prepare_demo_data: the demo corpus, QA and tokenizer.\n")
        splits = stdlib_passages()
        for split in ("train", "heldout"):
            write_jsonl(paths[split], [{"text": t} for t in splits[split]])
            # Held out: all three questions of every passage (3x the questions for the demo's verdict).
            write_jsonl(paths[f"qa_{split}"], synthetic_qa(splits[split], seed=cfg.run.seed,
                                                           every_question=split == "heldout"))
        if tokenizer_dir:
            train_tokenizer(splits["train"], c.tiny_vocab).save_pretrained(tokenizer_dir)
    d = cfg.data
    return dataclasses.replace(
        cfg, compressor=dataclasses.replace(c, tokenizer_dir=c.tokenizer_dir or tokenizer_dir),
        data=dataclasses.replace(d, text_file=d.text_file or paths["train"],
                                 val_text_file=d.val_text_file or paths["heldout"],
                                 qa_file=d.qa_file or paths["qa_train"],
                                 val_qa_file=d.val_qa_file or paths["qa_heldout"]))


def synthetic_qa(texts: list[str], seed: int = 0, every_question: bool = False) -> list[dict[str, str]]:
    """Questions answerable only from the passage (another passage's memory gives another answer): its
    first, second or third word -- one drawn at random per passage, or all three with ``every_question``
    (consecutive records then share a passage). (Asking which word follows a given word was too hard for the
    3.5M demo model in 300 steps: it answered the most frequent word every time.)"""
    rng, out = random.Random(seed), []
    for t in texts:
        words = t.split()[:40]
        if len(words) < 8:
            continue
        for k in range(3) if every_question else [rng.randrange(3)]:
            out.append({"context": " ".join(words), "question": f"What is the {('first', 'second', 'third')[k]} "
                        "word of the passage?", "answer": words[k]})
    return out


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write records as JSONL to a temporary name, then rename (never half-written)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
