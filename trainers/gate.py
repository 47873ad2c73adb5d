"""Train LycheeMemory's gate (seeds 000 / 001: a classifier trained apart) over ``memcomp.lychee.gate.train_gate``.

    python -m memcomp.trainers.gate run.init_from=runs/demo/cpt/compressor
    python -m memcomp.trainers.gate init_from=DIR data.source=labelled.jsonl out_dir=runs/gate target_recall=0.98

Data (``data.source``): ``synthetic`` (default) generates the synthetic multi-hop task (``memcomp.eval.synthetic``:
invented facts among distractor paragraphs from ``data.distractors_file``, or the Python standard library's
docstrings without it), cuts each context into blocks of ``data.block_tokens`` tokens labelled related when they hold
evidence, with the ideal working memory at each block (``gate_examples_from_synthetic``); a held-out set of
``data.heldout_examples`` more examples (another seed) measures the saved gate afterwards. Any other value is a JSON
Lines file of labelled examples, one question per line::

    {"question": "...", "blocks": ["block text", ...], "related": [true, false, ...],
     "working_memories": ["No previous memory", ...]}          # optional, one per block

each block encoded alone by the compressor (as a block store encodes it); ``data.heldout_file`` (same format) is the
held-out set. The compressor is ``run.init_from`` (a saved ``MemoryCompressor``; the gate is tied to its exact
weights). ``train_gate`` splits the training examples by question, trains the LoRA and the head with a weighted binary
loss, and sets each mode's threshold on the validation questions for ``train.target_recall``.

Writes to ``run.out_dir``: the gate (``gate.safetensors`` + ``gate.json``, loadable by ``Gate.load`` and
``memcomp ask/eval --gate``), ``metrics.jsonl`` (the loss of every step) and ``summary.json`` (thresholds; validation
and held-out recall, precision, skipped fraction and AUC per mode; the validation loss before and after; counts,
seconds, the configuration). The same numbers are printed.

Options are ``section.key=value`` as in the other trainers (``gate.rank=16``, ``train.epochs=4``; a key unique across
sections may drop its section); ``--help`` lists them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from memcomp.trainers.config import apply_overrides, options_help

from memcomp.lychee.gate import GateConfig, GateExample, GateTrainConfig, evaluate_gate, train_gate


@dataclass(frozen=True)
class GateDataSettings:
    """Where the labelled blocks come from (see the module docstring). For ``source=synthetic``: ``num_examples``
    training questions and ``heldout_examples`` held-out ones, ``hops``, ``target_tokens`` per context,
    ``num_confusers``, ``block_tokens`` (B: a multiple of the compressor's chunk size), ``distractors_file`` (a text
    file, paragraphs separated by blank lines; "" = stdlib docstrings), ``seed``. For a JSONL ``source``:
    ``heldout_file`` ("" = no held-out measurement)."""

    source: str = "synthetic"
    num_examples: int = 64
    heldout_examples: int = 16
    hops: int = 1
    target_tokens: int = 512
    num_confusers: int = 2
    block_tokens: int = 64
    distractors_file: str = ""
    heldout_file: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("data.source must be 'synthetic' or a JSONL file of labelled examples")
        for name in ("num_examples", "target_tokens", "block_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.heldout_examples < 0 or self.num_confusers < 0:
            raise ValueError("data.heldout_examples and data.num_confusers must be >= 0")
        if self.hops not in (1, 2):
            raise ValueError(f"data.hops must be 1 or 2, got {self.hops}")


@dataclass(frozen=True)
class GateRunSettings:
    """``init_from``: the saved compressor the gate is trained for (required); ``out_dir``; ``device`` ("auto":
    cuda when available, else cpu); ``progress``: progress bars while the examples are encoded."""

    init_from: str = ""
    out_dir: str = "runs/gate"
    device: str = "auto"
    progress: bool = True


@dataclass(frozen=True)
class GateRunConfig:
    """The gate trainer's configuration: ``gate`` (architecture: ``GateConfig``), ``train`` (``GateTrainConfig``),
    ``data``, ``run``."""

    gate: GateConfig = field(default_factory=GateConfig)
    train: GateTrainConfig = field(default_factory=GateTrainConfig)
    data: GateDataSettings = field(default_factory=GateDataSettings)
    run: GateRunSettings = field(default_factory=GateRunSettings)


def _read_jsonl(path: str) -> list[tuple[int, str, list[str], list[bool], Optional[list[str]]]]:
    """The rows of a JSONL file of labelled examples (module docstring), checked before the model loads. Raises
    ``FileNotFoundError``; ``ValueError`` naming the line for malformed JSON, a missing or mistyped field, lengths
    that differ, or an empty file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labelled examples file {path} not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected an object with question, blocks, related")
            missing = [k for k in ("question", "blocks", "related") if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: missing field(s) {missing}")
            blocks, related, memories = row["blocks"], row["related"], row.get("working_memories")
            if not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) and b for b in blocks):
                raise ValueError(f"{path}:{n}: blocks must be a non-empty list of non-empty strings")
            if not isinstance(related, list) or not all(isinstance(r, bool) for r in related):
                raise ValueError(f"{path}:{n}: related must be a list of true / false")
            if len(related) != len(blocks) or (memories is not None and (not isinstance(memories, list)
                                                                         or len(memories) != len(blocks))):
                raise ValueError(f"{path}:{n}: blocks, related and working_memories must have one entry per block")
            rows.append((n, row["question"], blocks, related, memories))
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


def _encode_rows(compressor: Any, path: str, rows: list, progress: bool) -> list[GateExample]:
    """``GateExample``s of checked JSONL rows, each block encoded alone (as a block store encodes it)."""
    from tqdm.auto import tqdm

    out = []
    for n, question, blocks, related, memories in tqdm(rows, desc="encoding blocks", unit="question",
                                                       disable=not progress):
        try:
            out.append(GateExample(question, tuple(compressor.encode(blocks)), tuple(related),
                                   None if memories is None else tuple(memories)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{n}: {exc}") from exc
    return out


def _synthetic(compressor: Any, data: GateDataSettings, count: int, seed: int, progress: bool) -> list[GateExample]:
    from tqdm.auto import tqdm

    from memcomp.eval.synthetic import SyntheticConfig, generate_dataset
    from memcomp.lychee.gate import gate_examples_from_synthetic

    if data.distractors_file:
        with open(data.distractors_file, encoding="utf-8") as f:
            distractors = [" ".join(p.split()) for p in f.read().split("\n\n") if p.strip()]
    else:
        from memcomp.demo.corpus import stdlib_passages

        distractors = stdlib_passages()["train"]
    cfg = SyntheticConfig(hops=data.hops, num_distractors=0, target_tokens=data.target_tokens,
                          num_confusers=data.num_confusers)
    examples = generate_dataset(distractors, count, cfg, seed=seed, tokenizer=compressor.tokenizer)
    out: list[GateExample] = []
    for ex in tqdm(examples, desc="encoding blocks", unit="question", disable=not progress):
        out += gate_examples_from_synthetic(compressor, [ex], data.block_tokens)
    return out


def _metrics_json(metrics: dict[str, Any]) -> dict[str, Any]:
    return {mode: dataclasses.asdict(m) for mode, m in metrics.items()}


def run(cfg: GateRunConfig) -> dict[str, Any]:
    """Train and save the gate (module docstring); returns the summary written to ``summary.json``.

    Raises ``ValueError`` without ``run.init_from`` or for bad data (before training), ``MemoryFileError`` for a
    folder that holds no compressor, and what ``train_gate`` raises (too few examples, no related block among the
    training or validation questions)."""
    import torch

    from memcomp import MemoryCompressor

    if not cfg.run.init_from:
        raise ValueError("run.init_from is required: the saved compressor the gate is for (its scores read that "
                         "compressor's hidden states)")
    if not os.path.isdir(cfg.run.init_from):
        raise FileNotFoundError(f"run.init_from={cfg.run.init_from}: no such folder")
    if cfg.data.source != "synthetic" and not os.path.isfile(cfg.data.source):
        raise FileNotFoundError(f"data.source={cfg.data.source}: no such file (or use data.source=synthetic)")
    for name in ("distractors_file", "heldout_file"):
        path = getattr(cfg.data, name)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"data.{name}={path}: no such file")
    jsonl = {}
    if cfg.data.source != "synthetic":
        jsonl["train"] = _read_jsonl(cfg.data.source)
        if cfg.data.heldout_file:
            jsonl["heldout"] = _read_jsonl(cfg.data.heldout_file)
    t0 = time.perf_counter()
    device = cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    compressor = MemoryCompressor.from_pretrained(cfg.run.init_from, device=device)
    if cfg.data.source == "synthetic":
        train_ex = _synthetic(compressor, cfg.data, cfg.data.num_examples, cfg.data.seed, cfg.run.progress)
        # Another seed, so no held-out question shares its invented entities with a training one.
        held = (_synthetic(compressor, cfg.data, cfg.data.heldout_examples, cfg.data.seed + 1, cfg.run.progress)
                if cfg.data.heldout_examples else [])
    else:
        train_ex = _encode_rows(compressor, cfg.data.source, jsonl["train"], cfg.run.progress)
        held = (_encode_rows(compressor, cfg.data.heldout_file, jsonl["heldout"], cfg.run.progress)
                if "heldout" in jsonl else [])
    encode_seconds = time.perf_counter() - t0
    n_rows = sum(len(e.blocks) for e in train_ex)
    print(f"memcomp gate: {len(train_ex)} questions, {n_rows} blocks "
          f"({sum(sum(e.related) for e in train_ex)} related); training {cfg.train.epochs} epochs", file=sys.stderr)
    result = train_gate(compressor, train_ex, config=cfg.gate, train=cfg.train, out_dir=cfg.run.out_dir)
    heldout = _metrics_json(evaluate_gate(result.gate, held, batch_size=cfg.train.batch_size)) if held else None
    summary = {
        "out_dir": cfg.run.out_dir, "init_from": cfg.run.init_from, "fingerprint": result.gate.fingerprint,
        "thresholds": dict(result.gate.thresholds), "target_recall": cfg.train.target_recall,
        "validation": _metrics_json(result.metrics), "heldout": heldout,
        "val_loss_before": result.val_loss_before, "val_loss_after": result.val_loss_after,
        "steps": len(result.losses), "num_train_examples": result.num_train_examples,
        "num_val_examples": result.num_val_examples, "num_heldout_examples": len(held),
        "encode_seconds": encode_seconds, "train_seconds": result.seconds,
        "config": dataclasses.asdict(cfg),
    }
    with open(os.path.join(cfg.run.out_dir, "metrics.jsonl"), "w") as f:
        for step, loss in enumerate(result.losses, 1):
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
    tmp = os.path.join(cfg.run.out_dir, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(cfg.run.out_dir, "summary.json"))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"memcomp gate: {s['steps']} steps in {s['train_seconds']:.1f} s (+ {s['encode_seconds']:.1f} s "
             f"encoding); validation loss {s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f}",
             f"  target recall {s['target_recall']}      threshold   recall  precision  skipped   AUC"]
    for split in ("validation", "heldout"):
        if not s[split]:
            continue
        for mode, m in s[split].items():
            auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
            lines.append(f"  {split:<10} {mode:<11} {m['threshold']:>9.4f}  {m['recall']:>6.3f}  "
                         f"{m['precision']:>9.3f}  {m['skipped']:>7.3f}  {auc:>5}")
    lines.append(f"  wrote {s['out_dir']}/gate.safetensors, gate.json, summary.json, metrics.jsonl")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    from memcomp.memory import MemoryFileError, MemoryMismatchError

    p = argparse.ArgumentParser(prog="python -m memcomp.trainers.gate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=options_help(GateRunConfig, recipes=False))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any option below (JSON values, else strings)")
    args = p.parse_args(argv)
    try:
        cfg = apply_overrides(GateRunConfig(), args.overrides)
        summary = run(cfg)
    except (ValueError, TypeError, FileNotFoundError, MemoryFileError, MemoryMismatchError) as exc:
        print(f"memcomp gate: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
