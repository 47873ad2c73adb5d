"""linear_cross_entropy (both implementations: the chunked PyTorch reference, and liger-kernel's Triton kernels,
in the interpreter on a CPU) against F.cross_entropy on materialised logits in fp64, with per-token upstream
gradients of any sign -- the RL trainer weights tokens by advantages."""

import importlib
import os
import re

import pytest
import torch
import torch.nn.functional as F
from testutil import CPU_DTYPES, DEVICE, GPU_DTYPES, HAS_CUDA

from memcomp.fused import linear_cross_entropy, use_backend

lce = importlib.import_module("memcomp.kernels.linear_cross_entropy")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMPLS = ["chunked", "liger"]
DTYPES = GPU_DTYPES if HAS_CUDA else CPU_DTYPES


def _case(M, d, V, dtype, bias=True, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, d, generator=g, dtype=torch.float64)
    W = torch.randn(V, d, generator=g, dtype=torch.float64) / d**0.5 * 3  # logits of a few units: a real softmax
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (M,), generator=g)
    # Advantage-like weights: both signs, exact zeros (masked tokens), none equal to the first.
    go = torch.randn(M, generator=g, dtype=torch.float64) * 2
    go[::4] = 0.0
    move = lambda x: None if x is None else x.to(device)
    return move(h), move(W), move(b), move(t), move(go)


def _oracle_and_eager(h, W, b, t, go, dtype):
    """(fp64 oracle, eager PyTorch at ``dtype``): losses and d(sum go * loss) / d(h, W, b) from autograd through
    F.cross_entropy on materialised logits (eager upcasts its logits to fp32, as Hugging Face models do)."""
    out = []
    for dt in (torch.float64, dtype):
        leaves = [x.to(dt).requires_grad_() for x in (h, W) + ((b,) if b is not None else ())]
        logits = leaves[0] @ leaves[1].t() + (leaves[2] if b is not None else 0)
        loss = F.cross_entropy(logits.float() if dt != torch.float64 else logits, t, reduction="none")
        out.append([loss, *torch.autograd.grad(loss, leaves, go.to(loss.dtype))])
    return out


def _ours(h, W, b, t, go, dtype, impl, **kw):
    leaves = [x.to(dtype).requires_grad_() for x in (h, W) + ((b,) if b is not None else ())]
    loss = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2] if b is not None else None, impl=impl, **kw)
    return [loss, *torch.autograd.grad(loss, leaves, go.float())]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_matches_fp64_cross_entropy_with_per_token_weights(impl, dtype, bias, close_to_oracle):
    # V > d, so liger splits the 13 rows into 4-row chunks; chunk_rows=4 leaves the chunked path a 1-row tail.
    h, W, b, t, go = _case(13, 24, 97, dtype, bias=bias)
    oracle, eager = _oracle_and_eager(h, W, b, t, go, dtype)
    ours = _ours(h, W, b, t, go, dtype, impl, chunk_rows=4)
    assert ours[0].dtype == torch.float32
    assert [x.dtype for x in ours[1:]] == [dtype] * len(ours[1:])
    for name, o, e, r in zip(["loss", "d_hidden", "d_weight", "d_bias"], ours, eager, oracle):
        close_to_oracle(o, e, r, f"{impl} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_each_token_gradient_is_weighted_by_its_own_upstream_gradient(impl):
    """The failure liger < 0.8.2 had: every token scaled by grad_output[0]. With the first weight 1 and the others
    0, the head's gradient must be the first token's alone -- not the sum over all tokens."""
    h, W, b, t, _ = _case(6, 16, 37, torch.float32)
    go = torch.zeros(6, dtype=torch.float64, device=DEVICE)
    go[0] = 1.0
    _, dh, dW, db = _ours(h, W, b, t, go, torch.float32, impl)
    _, dh0, dW0, db0 = _ours(h[:1], W, b, t[:1], go[:1], torch.float32, impl)
    assert dh[1:].abs().max() == 0
    torch.testing.assert_close(dh[:1], dh0)
    torch.testing.assert_close(dW, dW0)
    torch.testing.assert_close(db, db0)
    # and a negative weight (an advantage below the group mean) flips the sign of that token's gradient
    _, dh_neg, dW_neg, _ = _ours(h, W, b, t, -go, torch.float32, impl)
    torch.testing.assert_close(dh_neg, -dh)
    torch.testing.assert_close(dW_neg, -dW)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_logits_are_kept_for_the_backward(impl):
    """The forward saves its inputs only: nothing [M, V] waits for the backward (the logits are recomputed)."""
    h, W, b, t, go = _case(9, 16, 53, torch.float32)
    saved = []

    def pack(x):
        saved.append(tuple(x.shape))
        return x

    leaves = [x.float().requires_grad_() for x in (h, W, b)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], impl=impl)
    assert sorted(saved) == sorted([(9, 16), (53, 16), (53,), (9,)]), saved
    (loss * go.float()).sum().backward()
    assert all(x.grad is not None for x in leaves)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_inputs_get_no_gradient(impl):
    h, W, b, t, go = _case(5, 16, 37, torch.float32)
    hf, Wf, bf = h.float().requires_grad_(), W.float(), b.float()  # a frozen head: only hidden trains
    (linear_cross_entropy(hf, Wf, t, bf, impl=impl) * go.float()).sum().backward()
    ref = _ours(h, W, b, t, go, torch.float32, impl)[1]
    torch.testing.assert_close(hf.grad, ref)
    assert Wf.grad is None and bf.grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    h, W, b, t, _ = _case(0, 16, 37, torch.float32)
    leaves = [x.float().requires_grad_() for x in (h, W, b)]
    loss = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], impl=impl)
    assert loss.shape == (0,) and loss.dtype == torch.float32
    loss.sum().backward()
    assert leaves[0].grad.shape == (0, 16)
    assert leaves[1].grad.abs().max() == 0 and leaves[2].grad.abs().max() == 0


def test_the_resolver_picks_the_implementation(monkeypatch):
    """auto: the chunked reference on CPU tensors, liger on CUDA ones; use_backend forces either."""
    calls = []
    for name in ("linear_cross_entropy_liger_forward", "linear_cross_entropy_chunked_forward"):
        real = getattr(lce, name)
        monkeypatch.setattr(lce, name, lambda *a, _n=name, _r=real: calls.append(_n.split("_")[3]) or _r(*a))
    h, W, b, t, _ = _case(4, 16, 37, torch.float32)
    h, W, b = h.float(), W.float(), b.float()
    with use_backend("auto"):
        linear_cross_entropy(h, W, t, b)
    with use_backend("reference"):
        linear_cross_entropy(h, W, t, b)
    with use_backend("triton"):
        linear_cross_entropy(h, W, t, b)
    assert calls == ["liger" if HAS_CUDA else "chunked", "chunked", "liger"]
    linear_cross_entropy(h, W, t, b, impl="chunked")
    assert calls[-1] == "chunked"


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors")
def test_liger_on_cpu_outside_the_interpreter_is_a_clear_error(monkeypatch):
    h, W, b, t, _ = _case(4, 16, 37, torch.float32)
    h, W = h.float(), W.float()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="liger-kernel's Triton kernels need CUDA tensors"):
        linear_cross_entropy(h, W, t, impl="liger")
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear_cross_entropy(h, W, t)
    linear_cross_entropy(h, W, t)  # auto: the reference, no error


def test_a_liger_below_the_floor_is_refused(monkeypatch):
    """An installed liger-kernel older than 0.8.2 back-propagates per-token weights wrongly: never run it."""
    lce._liger_problem.cache_clear()
    monkeypatch.setattr(lce.importlib.metadata, "version", lambda name: "0.8.1")
    try:
        assert not lce.liger_usable()
        h, W, b, t, _ = _case(4, 16, 37, torch.float32)
        with pytest.raises(ImportError, match="older than 0.8.2.*Liger-Kernel#1298"):
            linear_cross_entropy(h.float(), W.float(), t, impl="liger")
        with use_backend("triton"), pytest.raises(ImportError, match="older than 0.8.2"):
            linear_cross_entropy(h.float(), W.float(), t)
    finally:
        lce._liger_problem.cache_clear()


def test_auto_on_cuda_without_a_usable_liger_warns_and_runs_the_reference(monkeypatch):
    """The resolver's rule for a missing triton, applied to liger: a warning naming the fix, never silence."""
    monkeypatch.setattr(lce, "resolve", lambda op, *tensors: "triton")  # what the resolver answers on CUDA
    lce._liger_problem.cache_clear()
    lce._warn_once.cache_clear()
    monkeypatch.setattr(lce.importlib.metadata, "version", lambda name: "0.8.1")
    try:
        h, W, b, t, _ = _case(4, 16, 37, torch.float32)
        with use_backend("auto"), pytest.warns(RuntimeWarning, match="older than 0.8.2.*chunked PyTorch reference"):
            assert lce._pick("auto", (h.float(), W.float())) == "chunked"
    finally:
        lce._liger_problem.cache_clear()
        lce._warn_once.cache_clear()


def test_the_liger_floor_is_the_packaged_one():
    """pyproject.toml states the op's floor, and the installed liger-kernel is at or above it."""
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        text = f.read()
    assert re.search(rf'"liger-kernel>={re.escape(lce.LIGER_FLOOR)}"', text), (
        f"pyproject.toml must require liger-kernel>={lce.LIGER_FLOOR}")
    assert lce.liger_usable(), lce._liger_problem()


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    h, W, b, t, _ = _case(7, 16, 37, torch.float32)
    h, W, b = h.float(), W.float(), b.float()
    op = torch.ops.memcomp.linear_cross_entropy.default
    for args in [(h.clone().requires_grad_(), W.clone().requires_grad_(), b.clone().requires_grad_(), t, impl, 3),
                 (h.clone().requires_grad_(), W.clone(), None, t, impl, 16),
                 (h, W, b, t, impl, 4)]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_compile_fullgraph(impl):
    h, W, b, t, go = _case(6, 16, 37, torch.float32)
    go = go.float()

    def f(h, W, b):
        return (linear_cross_entropy(h, W, t, b, impl=impl, chunk_rows=4) * go).sum()

    leaves = [x.float().requires_grad_() for x in (h, W, b)]
    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    loss.backward()
    ref = [x.float().requires_grad_() for x in (h, W, b)]
    expected = f(*ref)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for a, e in zip(leaves, ref):
        torch.testing.assert_close(a.grad, e.grad)


def test_bad_inputs_raise_clear_errors():
    h, W, b, t, _ = _case(4, 16, 37, torch.float32)
    h, W, b = h.float(), W.float(), b.float()
    cases = [
        (dict(hidden=h[0]), ValueError, "hidden must be \\[M, d\\]"),
        (dict(weight=W[:, :-1]), ValueError, "weight \\[V, d\\]"),
        (dict(weight=W[:0]), ValueError, "V = 0"),
        (dict(targets=t[:-1]), ValueError, "targets must be \\[M=4\\]"),
        (dict(bias=b[:-1]), ValueError, "bias must be \\[V=37\\]"),
        (dict(hidden=h.long(), weight=W.long()), TypeError, "fp32/fp16/bf16"),
        (dict(weight=W.half()), TypeError, "weight is torch.float16 but hidden is torch.float32"),
        (dict(targets=t.float()), TypeError, "class ids"),
        (dict(targets=t.to("meta")), ValueError, "targets is on meta"),
        (dict(targets=torch.tensor([0, 1, 37, 2])), ValueError, "row 2 has 37"),
        (dict(targets=torch.tensor([0, -100, 3, 2])), ValueError, "row 1 has -100.*no ignore_index"),
        (dict(chunk_rows=0), ValueError, "chunk_rows must be a positive int"),
        (dict(impl="fast"), ValueError, "impl must be one of"),
    ]
    for override, exc, msg in cases:
        kw = dict(hidden=h, weight=W, targets=t, bias=b) | override
        with pytest.raises(exc, match=msg):
            linear_cross_entropy(**kw)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_gpu_bf16_per_token_weights_at_a_large_vocabulary(impl, close_to_oracle):
    """bf16 at a real LM-head width: 1,536 target rows, d = 896, V = 151,936 (Qwen2.5-0.5B's head), advantage
    weights of both signs and zeros; liger's per-token gradients (>= 0.8.2) and ours within the tolerance policy."""
    h, W, b, t, go = _case(1536, 896, 151936, torch.bfloat16, bias=False, device="cuda")
    oracle, eager = _oracle_and_eager(h, W, None, t, go, torch.bfloat16)
    ours = _ours(h, W, None, t, go, torch.bfloat16, impl)
    for name, o, e, r in zip(["loss", "d_hidden", "d_weight"], ours, eager, oracle):
        close_to_oracle(o, e, r, f"{impl} {name}")
    with use_backend("auto"):
        assert lce._pick("auto", (h,)) == "liger"
