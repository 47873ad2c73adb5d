"""memcomp.rl.loss: DAPO's clipped loss against hand-computed values, its gradient, and token-mean aggregation
over micro-batches and over two gloo ranks."""

import math
import os
import socket
import sys

import pytest
import torch

from memcomp.rl.loss import dapo_policy_loss, global_token_count, token_mean_divisor

# Toy tokens (eps_low 0.2, eps_high 0.28): advantage, ratio, per-token loss, d loss / d logp, clipped side.
# loss = -min(r A, clip(r, 0.8, 1.28) A); where the unclipped branch is active d/dlogp = -A r (d r / d logp = r).
TOY = [
    # A     ratio  loss                  grad    clipped
    (1.0, 1.1, -1.1, -1.1, None),        # inside the range
    (1.0, 1.5, -1.28, 0.0, "high"),      # A > 0, r > 1 + eps_high: clipped, no gradient
    (1.0, 0.5, -0.5, -0.5, None),        # A > 0, r < 1 - eps_low: min picks r A, unclipped
    (-2.0, 0.5, 1.6, 0.0, "low"),        # A < 0, r < 1 - eps_low: clipped at 0.8, no gradient
    (-2.0, 1.5, 3.0, 3.0, None),         # A < 0, r > 1 + eps_high: min picks r A (clip-higher does not help)
    (-2.0, 0.9, 1.8, 1.8, None),         # inside
    (0.0, 2.0, 0.0, 0.0, None),          # zero advantage: nothing
    (1.0, 1.28, -1.28, -1.28, None),     # exactly on the upper bound: not counted as clipped
]


def _toy():
    adv = torch.tensor([t[0] for t in TOY])
    ratio = torch.tensor([t[1] for t in TOY], dtype=torch.float64)
    old = torch.linspace(-3.0, -1.0, len(TOY), dtype=torch.float64)
    logp = (old + ratio.log()).float().requires_grad_()
    return logp, old.float(), adv


def test_dapo_loss_against_hand_computed_values_and_gradient():
    logp, old, adv = _toy()
    out = dapo_policy_loss(logp, old, adv)
    assert out.loss_sum.dtype == torch.float32 and out.num_tokens == len(TOY)
    assert out.loss_sum.item() == pytest.approx(sum(t[2] for t in TOY), abs=1e-5)  # 2.24
    assert int(out.clipped_low) == 1 and int(out.clipped_high) == 1
    assert out.clip_fraction_low == pytest.approx(1 / 8) and out.clip_fraction_high == pytest.approx(1 / 8)
    out.loss_sum.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([t[3] for t in TOY]), rtol=1e-5, atol=1e-6)


def test_symmetric_clip_and_defaults_differ():
    """eps_high matters: with a symmetric 0.2 the second token is clipped at 1.2 instead of 1.28."""
    logp, old, adv = _toy()
    sym = dapo_policy_loss(logp, old, adv, eps_low=0.2, eps_high=0.2)
    dapo = dapo_policy_loss(logp, old, adv)
    assert (sym.loss_sum - dapo.loss_sum).item() == pytest.approx(-1.2 + 1.28 + (-1.2 + 1.28), abs=1e-5)


def test_token_mean_over_two_micro_batches_equals_one_batch():
    torch.manual_seed(0)
    n = 11
    logp = (-torch.rand(n) * 3).requires_grad_()
    old = (logp.detach() + 0.4 * torch.randn(n)).clamp(max=0)
    adv = torch.randn(n)
    full = dapo_policy_loss(logp, old, adv).loss_sum / n
    (g_full,) = torch.autograd.grad(full, logp)

    split = 3  # micro-batches of 3 and 8 tokens
    divisor = token_mean_divisor(split + (n - split))
    assert divisor == n
    g = torch.zeros(n)
    for sl in (slice(0, split), slice(split, n)):
        part = logp[sl].detach().requires_grad_()
        (dapo_policy_loss(part, old[sl], adv[sl]).loss_sum / divisor).backward()
        g[sl] = part.grad
    torch.testing.assert_close(g, g_full)
    # A mean of per-micro-batch means weighs the 3-token micro-batch's tokens 8/3 times more: not the same.
    g_mm = torch.cat([torch.autograd.grad(dapo_policy_loss(logp[sl], old[sl], adv[sl]).loss_sum / (sl.stop - sl.start)
                                          / 2, logp)[0][sl] for sl in (slice(0, split), slice(split, n))])
    assert not torch.allclose(g_mm, g_full)


def test_empty_micro_batch_is_legal():
    logp = torch.zeros(0, requires_grad=True)
    out = dapo_policy_loss(logp, torch.zeros(0), torch.zeros(0))
    assert out.num_tokens == 0 and out.loss_sum.item() == 0.0 and out.clip_fraction_high == 0.0
    out.loss_sum.backward()  # still part of the graph (a rank without tokens runs the same backward)


def test_large_ratio_gives_finite_loss_and_gradient():
    logp = torch.tensor([-0.01, -0.01], requires_grad=True)
    old = torch.tensor([-80.0, -80.0])  # log-ratio 80: exp overflows fp32 without the clamp
    out = dapo_policy_loss(logp, old, torch.tensor([1.0, -1.0]))
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(logp.grad).all()
    assert logp.grad[0].item() == 0.0  # A > 0 and clipped high: no gradient, not 0 * inf = NaN


def test_dapo_loss_rejects_bad_input():
    ok = torch.full((3,), -1.0)
    with pytest.raises(ValueError, match="1-D"):
        dapo_policy_loss(ok, ok[:2], ok)
    with pytest.raises(ValueError, match="1-D"):
        dapo_policy_loss(ok[None], ok[None], ok[None])
    with pytest.raises(TypeError, match="floating"):
        dapo_policy_loss(ok, ok, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="old_logp requires grad"):
        dapo_policy_loss(ok, ok.clone().requires_grad_(), ok)
    with pytest.raises(ValueError, match="advantages requires grad"):
        dapo_policy_loss(ok, ok, ok.clone().requires_grad_())
    with pytest.raises(ValueError, match="logp holds"):
        dapo_policy_loss(-ok, ok, ok)  # per-token losses (positive) passed as log-probabilities
    with pytest.raises(ValueError, match="old_logp holds"):
        dapo_policy_loss(ok, torch.tensor([-1.0, float("nan"), -1.0]), ok)
    with pytest.raises(ValueError, match="eps_low"):
        dapo_policy_loss(ok, ok, ok, eps_low=1.0)
    with pytest.raises(ValueError, match="grad_reduction"):
        token_mean_divisor(3, grad_reduction="avg")
    with pytest.raises(ValueError, match="no response tokens"):
        token_mean_divisor(0)
    with pytest.raises(ValueError, match="count"):
        global_token_count(-1)
    assert global_token_count(torch.tensor(5)) == 5


# ------------------------------------------------------------------------------------------------------------
# Two ranks (gloo on 127.0.0.1): each rank holds a different number of tokens
# ------------------------------------------------------------------------------------------------------------

V, D, N_TOKENS, RANK0_TOKENS = 7, 5, 10, 3


def _problem():
    """A shared policy (logits = X W^T) and the whole mini-batch, identical on every rank."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(V, D, generator=g)
    X = torch.randn(N_TOKENS, D, generator=g)
    tokens = torch.randint(0, V, (N_TOKENS,), generator=g)
    logp = torch.log_softmax(X @ W.T, -1)[torch.arange(N_TOKENS), tokens]
    old = (logp + 0.5 * torch.randn(N_TOKENS, generator=g)).clamp(max=0)  # ratios inside and outside the clip
    adv = torch.randn(N_TOKENS, generator=g)
    return W, X, tokens, old, adv


def _grad(W, X, tokens, old, adv, divisor):
    W = W.clone().requires_grad_()
    logp = torch.log_softmax(X @ W.T, -1)[torch.arange(len(tokens)), tokens]
    (dapo_policy_loss(logp, old, adv).loss_sum / divisor).backward()
    return W.grad


def _rank_worker(rank, port, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        W, X, tokens, old, adv = _problem()
        mine = slice(0, RANK0_TOKENS) if rank == 0 else slice(RANK0_TOKENS, N_TOKENS)
        n_local = mine.stop - mine.start
        res = {"global": global_token_count(n_local)}
        for mode in ("mean", "sum"):
            g = _grad(W, X[mine], tokens[mine], old[mine], adv[mine], token_mean_divisor(n_local, grad_reduction=mode))
            torch.distributed.all_reduce(g)  # what DDP / ZeRO do with gradients: sum, then / world for "mean"
            res[mode] = g / 2 if mode == "mean" else g
        g = _grad(W, X[mine], tokens[mine], old[mine], adv[mine], n_local)  # per-rank mean, then averaged
        torch.distributed.all_reduce(g)
        res["mean_of_means"] = g / 2
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_token_mean_over_two_gloo_ranks_equals_single_process(tmp_path):
    import subprocess

    # Two fresh processes running this file as a script (below), not forks of the test process: a fork taken
    # after torch's intra-op thread pool has started can deadlock in the child's first parallel op (seen once in a
    # full-suite run), and pytest's importlib mode does not let a spawned child import this module by name.
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    W, X, tokens, old, adv = _problem()
    reference = _grad(W, X, tokens, old, adv, N_TOKENS)  # one process, the whole mini-batch's token-mean
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert res["global"] == N_TOKENS
        torch.testing.assert_close(res["mean"], reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["sum"], reference, rtol=1e-5, atol=1e-6)
        # 3 against 7 tokens: the per-rank mean weighs rank 0's tokens 7/3 times more
        assert not torch.allclose(res["mean_of_means"], reference, rtol=1e-3, atol=1e-4)
    assert math.isfinite(reference.abs().sum().item()) and reference.abs().sum() > 0


if __name__ == "__main__":  # one rank of the two-rank test above
    _rank_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
