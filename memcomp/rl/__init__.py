"""memcomp.rl: the building blocks of DAPO on memory-conditioned rollouts (seed 002, section 3.3.3 and Table 10).

The DAPO trainer (``memcomp.trainers.dapo``) composes these; each is usable and tested on its own:

- ``rewards``: answer extraction from ``\\boxed{}``, SQuAD-style normalisation, the binary rule reward
  (exact or sub-string match against any gold answer) and DAPO's soft overlong punishment.
- ``judge``: a generative-judge reward through any OpenAI-compatible chat-completions endpoint (the official
  ``openai`` client: time-outs, retries with backoff), with a cache and concurrent batches.
- ``advantages``: GRPO group advantages and DAPO's dynamic sampling (filter groups, refill, cap, warm-up,
  resumable state).
- ``loss``: DAPO's clipped policy loss (clip-higher) as a token sum plus count, and the global token-mean
  normaliser across micro-batches and ranks.
- ``engine``: the rollout-engine interface (sampling options, requests with memory embeddings, results with
  log-probabilities) and its first engine, Hugging Face ``generate`` on ``inputs_embeds``.

Uses torch, and for the engine the compressor (``memcomp.compressor``) and transformers; the judge needs the
``openai`` package (``pip install 'memcomp[rl]'``). Names are imported lazily, so importing one piece does not
pull in the others' dependencies.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "extract_boxed": "memcomp.rl.rewards",
    "normalize_answer": "memcomp.rl.rewards",
    "rule_reward": "memcomp.rl.rewards",
    "overlong_shaping": "memcomp.rl.rewards",
    "validate_gold_answers": "memcomp.rl.rewards",
    "JudgeConfig": "memcomp.rl.judge",
    "JudgeError": "memcomp.rl.judge",
    "GenerativeJudge": "memcomp.rl.judge",
    "JudgeItem": "memcomp.rl.judge",
    "group_advantages": "memcomp.rl.advantages",
    "token_advantages": "memcomp.rl.advantages",
    "DynamicSampler": "memcomp.rl.advantages",
    "DynamicSamplingError": "memcomp.rl.advantages",
    "dapo_policy_loss": "memcomp.rl.loss",
    "PolicyLossOutput": "memcomp.rl.loss",
    "global_token_count": "memcomp.rl.loss",
    "token_mean_divisor": "memcomp.rl.loss",
    "SamplingOptions": "memcomp.rl.engine",
    "GenerationRequest": "memcomp.rl.engine",
    "GenerationResult": "memcomp.rl.engine",
    "GenerationEngine": "memcomp.rl.engine",
    "HFEngine": "memcomp.rl.engine",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memcomp.rl' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
