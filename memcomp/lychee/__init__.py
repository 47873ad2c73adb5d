"""memcomp.lychee: the LycheeMemory system (seeds 000 / 001, issue 12) -- gated iterative reasoning over
compressed memory blocks.

The system is four parts: a block store (the input cut into blocks of B tokens, each compressed by a
``MemoryCompressor`` once, question-independent, persisted and read lazily), a gate (a LoRA classifier on the
shared backbone that scores blocks against the question and the working memory), a reasoner (the
MemAgent-style loop that reads the selected blocks and rewrites a bounded working memory) and the baselines it
is measured against (MemAgent over raw-text chunks, full context). Modules:

- ``store``: ``BlockStore`` (build from a str, a file or an iterator of text pieces, streaming; safetensors
  shards plus a JSON index; resumable; lazy, memory-mapped reads), ``BlockStoreConfig``, ``Block`` and the
  streaming tokenizer ``token_windows``.
- ``store_rss``: the streaming-memory measurement of a build (peak RSS per input length, in a child process), used
  by ``bench/bench_block_store.py``.
- ``prompts``: every prompt template (reasoner update and final answer, MemAgent's, full context, the gate's
  input), built as token ids.
- ``gate``: ``Gate`` (LoRA factors held outside the model, added by forward hooks only inside
  ``gate.active()``, plus a scoring head), ``train_gate`` / ``evaluate_gate`` (binary loss on labelled blocks,
  threshold for a target recall chosen on validation, saved with the compressor's fingerprint).
- ``reasoner``: ``LycheeReasoner`` (block selection by no gate, a question-only pre-filter or the sequential gate;
  the working-memory loop batched across questions; answers, traces, citations and cost).
- ``baselines``: ``MemAgent`` (the same loop over raw-text chunks) and ``FullContext``.

Generation goes only through ``memcomp.rl.engine.GenerationEngine`` (HF generate, or vLLM through
``memcomp.serving``). Names are imported lazily, so importing one part does not pull in the others' dependencies.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "BlockStore": "memcomp.lychee.store",
    "BlockStoreConfig": "memcomp.lychee.store",
    "Block": "memcomp.lychee.store",
    "TokenWindow": "memcomp.lychee.store",
    "token_windows": "memcomp.lychee.store",
    "Prompts": "memcomp.lychee.prompts",
    **{name: "memcomp.lychee.reasoner" for name in ("LycheeReasoner", "ReasonerConfig", "GenerationSettings",
                                                     "ReasonerResult", "Step", "Cost", "RunCost")},
    **{name: "memcomp.lychee.gate" for name in ("Gate", "GateConfig", "GateTrainConfig", "GateExample", "train_gate",
                                                 "evaluate_gate", "gate_examples_from_synthetic")},
    **{name: "memcomp.lychee.baselines" for name in ("MemAgent", "MemAgentConfig", "FullContext",
                                                      "FullContextConfig")},
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memcomp.lychee' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
