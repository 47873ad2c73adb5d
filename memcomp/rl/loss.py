"""DAPO's policy loss (DAPO, Yu et al. 2025, sections 3.1 and 3.3; seed 002, Table 10).

Per response token t with advantage A (its response's group advantage), current log-probability ``logp`` and the
log-probability the rollout engine reported for it, ``old_logp``:

    ratio = exp(logp - old_logp)
    loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)        eps_low 0.2, eps_high 0.28

Clip-higher (eps_high > eps_low) leaves more room to raise the probability of unlikely tokens with A > 0. No KL
penalty, no entropy bonus (Table 10: both coefficients 0); verl's extra "dual clip" bound for A < 0
(``clip_ratio_c``) is not part of DAPO's objective and is not applied.

Token-mean aggregation (DAPO section 3.3, verl ``loss_agg_mode="token-mean"``): the mini-batch's loss is the sum
of ``loss_t`` over ALL its response tokens -- across gradient-accumulation micro-batches and data-parallel ranks
-- divided by their total count; every token weighs the same whatever its response's length. So
``dapo_policy_loss`` returns the SUM over its tokens and their count, and the caller divides each micro-batch's
sum by ``token_mean_divisor`` of the whole mini-batch before ``backward``. Dividing per micro-batch and averaging
(a mean of means) weighs the tokens of short micro-batches more -- the bug verl once had under gradient
accumulation.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Union

import torch

# exp(20) = 4.9e8. The log-ratio is clamped there (as verl does) so that a token whose probability rose by
# orders of magnitude gives a finite ratio: exp overflowing to inf would make the clipped branch's zero gradient
# 0 * inf = NaN.
_MAX_LOG_RATIO = 20.0
_LOGP_SLACK = 1e-4


class PolicyLossOutput(NamedTuple):
    """``loss_sum``: scalar fp32, the sum of the per-token losses (differentiable w.r.t. ``logp``);
    ``num_tokens``: how many tokens it sums; ``clipped_low`` / ``clipped_high``: int64 scalar counts of tokens
    where the clipped branch is active -- A < 0 and ratio < 1 - eps_low, or A > 0 and ratio > 1 + eps_high;
    their gradient is zero. Sum counts over micro-batches and ranks like the loss."""

    loss_sum: torch.Tensor
    num_tokens: int
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor

    @property
    def clip_fraction_low(self) -> float:
        return float(self.clipped_low) / self.num_tokens if self.num_tokens else 0.0

    @property
    def clip_fraction_high(self) -> float:
        return float(self.clipped_high) / self.num_tokens if self.num_tokens else 0.0


def dapo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *,
                     eps_low: float = 0.2, eps_high: float = 0.28) -> PolicyLossOutput:
    """DAPO's clipped surrogate over a flat list of response tokens.

    ``logp [N]``: log-probabilities of the sampled tokens under the current policy (floating point, with grad;
    e.g. ``-memcomp.fused.linear_cross_entropy(hidden, W, tokens)``); ``old_logp [N]``: the same tokens'
    log-probabilities at rollout time (no grad); ``advantages [N]``: each token's response advantage
    (``token_advantages``; no grad). Computed in fp32. ``N = 0`` is legal (a rank with no tokens in a
    micro-batch) and gives a zero sum that still depends on ``logp``. Returns ``PolicyLossOutput``: divide
    ``loss_sum`` by ``token_mean_divisor(...)`` of the whole mini-batch, not by ``num_tokens``.

    Raises ``ValueError`` for tensors that are not 1-D of one length, ``TypeError`` for non-floating tensors,
    ``ValueError`` when ``old_logp`` or ``advantages`` require grad (rollout-time values and advantages are
    constants of the objective: a gradient through them is a bug upstream), when ``logp`` / ``old_logp`` hold
    NaN or values above 1e-4 (not log-probabilities), or for ``eps_low`` outside [0, 1) or a negative
    ``eps_high``."""
    if not 0 <= eps_low < 1 or eps_high < 0:
        raise ValueError(f"dapo_policy_loss: need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dapo_policy_loss: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"dapo_policy_loss: {name} must be floating point, got {t.dtype}")
        if t.dim() != 1 or t.shape != logp.shape:
            raise ValueError(f"dapo_policy_loss: logp, old_logp and advantages must be 1-D [N] of one length (one "
                             f"entry per response token), got {tuple(logp.shape)}, {tuple(old_logp.shape)}, "
                             f"{tuple(advantages.shape)}")
    for name, t in (("old_logp", old_logp), ("advantages", advantages)):
        if t.requires_grad:
            raise ValueError(f"dapo_policy_loss: {name} requires grad; it is a constant of the objective (detach it)")
    if logp.numel():
        # One host sync for both checks; it catches a sign slip (per-token losses passed as log-probs) and NaNs.
        # The margin admits the rounding of a fused cross-entropy, which can return -1e-7 for a token of
        # probability ~1.
        bad = torch.stack([(logp.detach() > _LOGP_SLACK).any() | logp.detach().isnan().any(),
                           (old_logp > _LOGP_SLACK).any() | old_logp.isnan().any()]).tolist()
        if any(bad):
            which = "logp" if bad[0] else "old_logp"
            raise ValueError(f"dapo_policy_loss: {which} holds NaN or values above {_LOGP_SLACK}; log-probabilities "
                             "are <= 0 (the fused loss returns -log p: negate it)")
    logp32, old32, adv = logp.float(), old_logp.float(), advantages.float()
    ratio = torch.exp((logp32 - old32).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss_sum = torch.maximum(unclipped, clipped).sum()  # -min(ratio A, clip(ratio) A)
    with torch.no_grad():
        low = ((adv < 0) & (ratio < 1 - eps_low)).sum()
        high = ((adv > 0) & (ratio > 1 + eps_high)).sum()
    return PolicyLossOutput(loss_sum, logp.numel(), low, high)


def global_token_count(num_tokens: Union[int, torch.Tensor], *, group: Optional[object] = None,
                       device: Optional[Union[str, torch.device]] = None) -> int:
    """The total number of response tokens of a mini-batch over all ranks: ``num_tokens`` (this rank's count,
    summed over its micro-batches) all-reduced (SUM) over ``group`` when ``torch.distributed`` is initialised,
    else ``num_tokens`` itself. Every rank must call it (a collective). ``device``: where the one-element
    reduction tensor lives (default: the current CUDA device for the NCCL backend, else CPU).

    Raises ``ValueError`` for a negative count or a non-integer one."""
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1 or num_tokens.is_floating_point():
            raise ValueError(f"global_token_count: expected an integer count, got a {num_tokens.dtype} tensor of "
                             f"shape {tuple(num_tokens.shape)}")
        num_tokens = int(num_tokens)
    if not isinstance(num_tokens, numbers.Integral) or isinstance(num_tokens, bool) or num_tokens < 0:
        raise ValueError(f"global_token_count: expected a count >= 0, got {num_tokens!r}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return int(num_tokens)
    if device is None:
        backend = torch.distributed.get_backend(group)
        device = "cuda" if backend == "nccl" else "cpu"
    t = torch.tensor([int(num_tokens)], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
    return int(t.item())


def token_mean_divisor(num_tokens: Union[int, torch.Tensor], *, grad_reduction: str = "mean",
                       group: Optional[object] = None, device: Optional[Union[str, torch.device]] = None) -> float:
    """What to divide each micro-batch's ``loss_sum`` by so that, after the data-parallel gradient reduction, the
    gradient is that of the token-mean over the whole mini-batch on every rank.

    ``num_tokens``: this rank's response tokens in the mini-batch (all its micro-batches). ``grad_reduction``:
    how the data-parallel wrapper combines the ranks' gradients -- "mean" (DDP, FSDP and DeepSpeed ZeRO divide
    the sum by the world size W) gives ``global_count / W``; "sum" (a plain all-reduce SUM, or a single process)
    gives ``global_count``. Without ``torch.distributed`` both give the local count. The logged loss value is
    ``sum over ranks of loss_sum / global_count``.

    Raises ``ValueError`` for an unknown ``grad_reduction`` or a mini-batch without tokens on any rank."""
    if grad_reduction not in ("mean", "sum"):
        raise ValueError(f"token_mean_divisor: grad_reduction must be 'mean' or 'sum', got {grad_reduction!r}")
    total = global_token_count(num_tokens, group=group, device=device)
    if total == 0:
        raise ValueError("token_mean_divisor: the mini-batch has no response tokens on any rank")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size(group) if distributed and grad_reduction == "mean" else 1
    return total / world
