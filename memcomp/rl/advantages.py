"""Group advantages and dynamic sampling (DAPO, Yu et al. 2025, sections 2.2 and 3.2; seed 002, Table 10).

``group_advantages``: GRPO's outcome advantage as verl's ``compute_grpo_outcome_advantage`` computes it: per
group of G responses to one prompt, ``(r - mean) / (std + 1e-6)`` with the unbiased standard deviation (n - 1 in
the denominator, ``torch.std``'s default), broadcast over the response's tokens (``token_advantages``).

``DynamicSampler``: DAPO's dynamic sampling as verl's DAPO recipe does it (``filter_groups``, metric "acc"):
drop every group whose filter values (the raw correctness, judged before the overlong penalty) are all equal --
its advantages are all 0, it gives no gradient -- and keep generating batches until the kept groups fill the
train batch, up to a cap. Seed 002 enables it only after 25 warm-up steps ("to let the model first learn the
output format"). Unlike verl, which discards the kept groups beyond the train batch, the sampler keeps them for
the next step (no rollout is wasted; they are one or more updates stale, which the importance ratio against
their rollout-time log-probabilities accounts for, as for a batch's second mini-batch) and saves them in its
state for resuming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Generic, Optional, TypeVar, Union

import torch

T = TypeVar("T")


def group_advantages(rewards: Union[torch.Tensor, Sequence[Sequence[float]]], eps: float = 1e-6) -> torch.Tensor:
    """``rewards [P, G]`` (one row per prompt, its G responses' rewards; a tensor or nested lists) -> advantages
    ``[P, G]`` float32 (float64 for a float64 input): ``(r - mean_g) / (std_g + eps)``, ``std`` unbiased
    (correction 1). A group whose rewards are all equal gets advantage 0 everywhere.

    Raises ``ValueError`` for a shape other than ``[P, G]``, ``G < 2`` (the unbiased std of one response is
    undefined: a group needs at least two responses), an empty batch or non-finite rewards, ``TypeError`` for
    non-numeric rewards."""
    try:
        r = torch.as_tensor(rewards)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"group_advantages: rewards must be real numbers ({exc})") from exc
    if r.dtype == torch.bool or r.is_complex():
        raise TypeError(f"group_advantages: rewards must be real numbers, got {r.dtype}")
    if r.dim() != 2:
        raise ValueError(f"group_advantages: rewards must be [prompts, responses per prompt], got shape "
                         f"{tuple(r.shape)}")
    P, G = r.shape
    if P == 0:
        raise ValueError("group_advantages: no groups")
    if G < 2:
        raise ValueError(f"group_advantages: groups of size {G}; GRPO / DAPO need at least 2 responses per prompt "
                         "(the unbiased std of one response is undefined)")
    r = r.to(torch.float64 if r.dtype == torch.float64 else torch.float32)
    if not torch.isfinite(r).all():
        raise ValueError("group_advantages: rewards contain NaN or inf")
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)  # correction=1 (unbiased), as verl's torch.std
    return (r - mean) / (std + eps)


def token_advantages(advantages: torch.Tensor, lengths: Union[torch.Tensor, Sequence[int]]) -> torch.Tensor:
    """Each response's advantage repeated over its tokens: ``advantages [R]`` (any shape, flattened in order:
    ``[P, G]`` row-major gives prompt-major responses) and ``lengths [R]`` (response token counts) ->
    ``[sum(lengths)]``, the layout ``dapo_policy_loss`` takes.

    Raises ``ValueError`` when the counts differ or a length is negative."""
    adv = advantages.reshape(-1)
    n = torch.as_tensor(lengths, dtype=torch.long, device=adv.device).reshape(-1)
    if n.numel() != adv.numel():
        raise ValueError(f"token_advantages: {adv.numel()} advantages but {n.numel()} lengths")
    if n.numel() and int(n.min()) < 0:
        raise ValueError("token_advantages: negative response length")
    return adv.repeat_interleave(n)


class DynamicSamplingError(RuntimeError):
    """Every generation batch allowed for one step was used and the kept groups still do not fill the train
    batch (the data are too easy or too hard for the policy)."""


class DynamicSampler(Generic[T]):
    """Fills train batches with informative groups.

    Use::

        sampler = DynamicSampler(batch_size=128, max_gen_batches=10, warmup_steps=25)
        while (batch := sampler.next_batch()) is None:
            groups, correct = generate_and_judge(next(prompts))     # one generation batch
            sampler.add(groups, correct)                              # correct[i]: 0/1 per response of group i
        train_on(batch)                                               # exactly batch_size groups

    A group is any object (the trainer's rollouts of one prompt); the sampler looks only at the filter values
    given beside it (DAPO filters on accuracy, the raw correctness before the overlong penalty). While
    ``steps_done < warmup_steps`` every group is kept; afterwards a group whose filter values are all equal is
    dropped. Kept groups beyond ``batch_size`` stay buffered for the next step, first in first out.
    ``max_gen_batches`` caps the generation batches of one step: ``add`` raises ``DynamicSamplingError`` when the
    cap is reached and the batch is still not full. ``stats()`` reports the current step's counts (for logging the
    kept-group fraction); ``state_dict()`` / ``load_state_dict()`` carry the buffer and counters across a resume
    (the groups are stored as given: they must be picklable for ``torch.save``).

    Raises ``ValueError`` for ``batch_size < 1``, ``max_gen_batches < 1`` or ``warmup_steps < 0``."""

    def __init__(self, batch_size: int, max_gen_batches: int = 10, warmup_steps: int = 25) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("max_gen_batches", max_gen_batches, 1),
                                 ("warmup_steps", warmup_steps, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"DynamicSampler: {name} must be an int >= {low}, got {value!r}")
        self.batch_size = batch_size
        self.max_gen_batches = max_gen_batches
        self.warmup_steps = warmup_steps
        self.steps_done = 0
        self._buffer: list[T] = []
        self._reset_step_counts()

    def _reset_step_counts(self) -> None:
        self._gen_batches = 0
        self._generated = 0
        self._kept = 0

    @property
    def filtering(self) -> bool:
        """Whether groups with all-equal filter values are dropped now (after the warm-up steps)."""
        return self.steps_done >= self.warmup_steps

    @property
    def num_buffered(self) -> int:
        return len(self._buffer)

    def add(self, groups: Sequence[T], filter_values: Sequence[Sequence[float]]) -> int:
        """Offer one generation batch: ``groups[i]`` with the filter values of its responses
        ``filter_values[i]`` (at least two). Returns how many of these groups were kept.

        Raises ``ValueError`` when the two lengths differ, a group has fewer than two values or a value is not a
        finite number, and ``DynamicSamplingError`` when this was the step's ``max_gen_batches``-th generation
        batch and the kept groups still do not fill ``batch_size`` (the message names the cap and the fraction
        of groups kept this step; the buffer keeps what was kept, so a caller that catches it may continue)."""
        if len(groups) != len(filter_values):
            raise ValueError(f"DynamicSampler.add: {len(groups)} groups but {len(filter_values)} filter-value lists")
        keep = []
        for i, values in enumerate(filter_values):
            vals = [float(v) for v in values]
            if len(vals) < 2:
                raise ValueError(f"DynamicSampler.add: group {i} has {len(vals)} responses; groups need at least 2")
            if not all(math.isfinite(v) for v in vals):
                raise ValueError(f"DynamicSampler.add: group {i} has a non-finite filter value {vals}")
            keep.append(not self.filtering or max(vals) != min(vals))
        kept = [g for g, k in zip(groups, keep) if k]
        self._buffer.extend(kept)
        self._gen_batches += 1
        self._generated += len(groups)
        self._kept += len(kept)
        if len(self._buffer) < self.batch_size and self._gen_batches >= self.max_gen_batches:
            frac = self._kept / self._generated if self._generated else 0.0
            raise DynamicSamplingError(
                f"dynamic sampling: {self._gen_batches} generation batches (the cap, max_gen_batches="
                f"{self.max_gen_batches}) kept {self._kept} of {self._generated} groups ({frac:.1%}), and "
                f"{len(self._buffer)} buffered groups do not fill the train batch of {self.batch_size}: nearly every "
                "group's responses are all right or all wrong (data too easy or too hard for the policy); raise "
                "max_gen_batches, use larger generation batches, or change the data")
        return len(kept)

    def next_batch(self) -> Optional[list[T]]:
        """The next train batch (``batch_size`` groups, oldest first) when enough are buffered, else None (generate
        another batch and ``add`` it). Taking a batch completes a step: ``steps_done`` grows by one and the
        per-step counts start again."""
        if len(self._buffer) < self.batch_size:
            return None
        batch, self._buffer = self._buffer[: self.batch_size], self._buffer[self.batch_size:]
        self.steps_done += 1
        self._reset_step_counts()
        return batch

    def stats(self) -> dict[str, Any]:
        """This step's counts so far: generation batches, groups generated and kept, the kept fraction, and
        whether filtering is on (call before ``next_batch``, which starts a new step)."""
        return {"gen_batches": self._gen_batches, "groups_generated": self._generated, "groups_kept": self._kept,
                "kept_fraction": self._kept / self._generated if self._generated else float("nan"),
                "filtering": self.filtering, "buffered": len(self._buffer)}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the settings (checked on load), the step count, the buffered groups and this
        step's counts (a checkpoint between two generation batches of one step resumes that step)."""
        return {"batch_size": self.batch_size, "max_gen_batches": self.max_gen_batches,
                "warmup_steps": self.warmup_steps, "steps_done": self.steps_done, "buffer": list(self._buffer),
                "gen_batches": self._gen_batches, "generated": self._generated, "kept": self._kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output. Raises ``KeyError`` for a missing entry and ``ValueError`` when the
        batch size or warm-up differ from this sampler's (the resumed run would not be the same run; the cap
        may change)."""
        missing = [k for k in ("batch_size", "warmup_steps", "steps_done", "buffer", "gen_batches", "generated",
                               "kept") if k not in state]
        if missing:
            raise KeyError(f"DynamicSampler.load_state_dict: missing {missing}")
        for k in ("batch_size", "warmup_steps"):
            if state[k] != getattr(self, k):
                raise ValueError(f"DynamicSampler.load_state_dict: the saved {k} is {state[k]}, this sampler's "
                                 f"{getattr(self, k)}")
        self.steps_done = int(state["steps_done"])
        self._buffer = list(state["buffer"])
        self._gen_batches, self._generated, self._kept = (int(state[k]) for k in ("gen_batches", "generated",
                                                                                   "kept"))
