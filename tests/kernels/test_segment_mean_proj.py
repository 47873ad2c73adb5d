"""segment_mean_proj: the Triton kernels (interpreter on CPU) against the eager reference and fp64."""

import importlib

import pytest
import torch
from testutil import CPU_DTYPES, DEVICE, GPU_DTYPES, HAS_CUDA

from memcomp.fused import segment_mean_proj, segment_mean_proj_reference, use_backend

smp_module = importlib.import_module("memcomp.kernels.segment_mean_proj")
DTYPES = GPU_DTYPES if HAS_CUDA else CPU_DTYPES


def _cu(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu


def _inputs(lengths, d, d_out, dtype, bias=True, norm=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    # Hidden states with a per-row scale, like a transformer's residual stream.
    h = torch.randn(T, d, generator=g, dtype=torch.float64) * (0.5 + 3 * torch.rand(T, 1, generator=g,
                                                                                       dtype=torch.float64))
    w = torch.randn(d_out, d, generator=g, dtype=torch.float64) / d ** 0.5
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    nw = 1 + 0.5 * torch.randn(d, generator=g, dtype=torch.float64) if norm else None
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)
    return _cu(lengths).to(DEVICE), (h, w, b, nw), tuple(cast(t) for t in (h, w, b, nw))


def _grads(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


CASES = [
    pytest.param([16] * 6, 48, 48, id="full-chunks"),
    pytest.param([16, 16, 16, 5], 50, 24, id="partial-last-chunk-odd-d"),
    pytest.param([1, 1, 3, 1, 16, 1], 37, 19, id="length-1-segments"),
    pytest.param([40, 3, 33], 24, 16, id="segments-longer-than-a-tile"),
    pytest.param([1 + (i * 7) % 5 for i in range(200)], 24, 12, id="200-segments"),
]


@pytest.mark.parametrize("lengths,d,d_out", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm,bias", [(True, True), (True, False), (False, True)], ids=["norm+bias", "norm", "bias"])
def test_forward_and_gradients_match_reference(lengths, d, d_out, dtype, norm, bias, close_to_oracle):
    cu, f64, ours_in = _inputs(lengths, d, d_out, dtype, bias=bias, norm=norm)
    dout = torch.randn(len(lengths), d_out, dtype=torch.float64)

    def run(h, w, b, nw):
        return segment_mean_proj(h, cu, w, b, nw, 1e-6)

    def ref(h, w, b, nw):
        return segment_mean_proj_reference(h, cu.to(h.device), w, b, nw, 1e-6)

    with use_backend("triton"):
        out, grads = _grads(run, ours_in, dout.to(DEVICE))
    eager_out, eager_grads = _grads(ref, ours_in, dout.to(DEVICE))
    oracle_out, oracle_grads = _grads(ref, [None if t is None else t.to(DEVICE) for t in f64], dout.to(DEVICE))

    assert out.dtype == dtype and out.shape == (len(lengths), d_out)
    close_to_oracle(out, eager_out, oracle_out, "out")
    for name, g, ge, go in zip(("d_hidden", "d_weight", "d_bias", "d_norm_weight"), grads, eager_grads,
                               oracle_grads):
        if go is None:
            assert g is None, name
            continue
        assert g is not None and g.dtype == dtype, name
        close_to_oracle(g, ge, go, name)


def test_row_strided_hidden_is_read_in_place(monkeypatch):
    """A row-strided view (e.g. a slice of a wider buffer) needs no copy and gives the same result."""
    cu, _, (h, w, b, nw) = _inputs([5, 3, 4], 20, 8, torch.float32)
    wide = torch.randn(h.shape[0], 32, dtype=h.dtype, device=h.device)
    wide[:, 4:24] = h
    view = wide[:, 4:24].requires_grad_()
    assert not view.is_contiguous()
    with use_backend("triton"):
        out = segment_mean_proj(view, cu, w, b, nw)
        out.sum().backward()
    h2 = h.clone().requires_grad_()
    ref = segment_mean_proj_reference(h2, cu, w, b, nw)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(view.grad, h2.grad, rtol=1e-5, atol=1e-5)


def test_frozen_hidden_skips_d_hidden(monkeypatch):
    cu, _, (h, w, b, nw) = _inputs([4, 4, 3], 20, 8, torch.float32)
    calls = []
    real = smp_module.segment_mean_proj_backward
    monkeypatch.setattr(smp_module, "segment_mean_proj_backward", lambda *a: calls.append(1) or real(*a))
    w.requires_grad_()
    with use_backend("triton"):
        segment_mean_proj(h, cu, w, b, nw).sum().backward()
    assert w.grad is not None and not calls


def test_auto_backend_uses_reference_on_cpu_and_triton_when_forced(monkeypatch):
    cu, _, (h, w, b, nw) = _inputs([3, 2], 16, 8, torch.float32)
    calls = []
    real = smp_module.segment_mean_proj_forward
    monkeypatch.setattr(smp_module, "segment_mean_proj_forward", lambda *a: calls.append(1) or real(*a))
    with use_backend("auto"):
        auto = segment_mean_proj(h, cu, w, b, nw)
    assert len(calls) == (1 if HAS_CUDA else 0)
    with use_backend("triton"):
        forced = segment_mean_proj(h, cu, w, b, nw)
    assert len(calls) == (2 if HAS_CUDA else 1)
    torch.testing.assert_close(auto, forced)


def test_opcheck():
    cu, _, (h, w, b, nw) = _inputs([5, 1, 16, 3], 24, 10, torch.float32)
    for args in [(h.requires_grad_(), cu, w.requires_grad_(), b, nw.requires_grad_(), 1e-6, True),
                 (h.detach(), cu, w.detach(), None, None, 1e-5, False)]:
        torch.library.opcheck(torch.ops.memcomp.segment_mean_proj.default, args)


def test_torch_compile_fullgraph():
    cu, _, (h, w, b, nw) = _inputs([4, 4, 2], 24, 8, torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b, nw)]

    def f(h, w, b, nw):
        return (segment_mean_proj(h, cu, w, b, nw, check_inputs=False) * 2).sum()

    with use_backend("triton"):
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        loss = compiled(*leaves)
        loss.backward()
        expected = f(h, w, b, nw)
    torch.testing.assert_close(loss, expected)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (h, w, b, nw)]
    segment_mean_proj_reference(ref_leaves[0], cu, *ref_leaves[1:]).mul(2).sum().backward()
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs_raise_clear_errors(backend):
    cu, _, (h, w, b, nw) = _inputs([4, 3], 16, 8, torch.float32)
    T = h.shape[0]
    bad = [
        (dict(hidden=h[0]), "hidden must be \\[T, d\\]"),
        (dict(hidden=h.long()), "fp32/fp16/bf16"),
        (dict(weight=w[:, :-1]), "weight must be \\[d_out, d=16\\]"),
        (dict(bias=b[:-1]), "bias must be"),
        (dict(norm_weight=nw[:-1]), "norm_weight must be"),
        (dict(cu_seqlens=torch.tensor([1, 4, T], dtype=torch.int32)), "from 0 to T"),
        (dict(cu_seqlens=torch.tensor([0, 4, T - 1], dtype=torch.int32)), "from 0 to T"),
        (dict(cu_seqlens=torch.tensor([0, 5, 4, T], dtype=torch.int32)), "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0, 4, 4, T], dtype=torch.int32)), "segment 1 .* is empty"),
        (dict(cu_seqlens=torch.tensor([[0, T]], dtype=torch.int32)), "1-D"),
        (dict(cu_seqlens=torch.tensor([0.0, T])), "int32"),
        (dict(weight=w.to("meta")), "weight is on meta"),
    ]
    base = dict(hidden=h, cu_seqlens=cu, weight=w, bias=b, norm_weight=nw)
    with use_backend(backend):
        for override, msg in bad:
            with pytest.raises((ValueError, TypeError), match=msg):
                segment_mean_proj(**{**base, **override})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_width(dtype, close_to_oracle):
    """Qwen2.5-7B width, 16-token chunks, a partial last chunk: bf16 is only trustworthy on a GPU."""
    lengths = [16] * 511 + [7]
    cu, f64, ours_in = _inputs(lengths, 3584, 3584, dtype)
    dout = torch.randn(len(lengths), 3584, dtype=torch.float64)

    def run(h, w, b, nw):
        return segment_mean_proj(h, cu, w, b, nw)

    def ref(h, w, b, nw):
        return segment_mean_proj_reference(h, cu, w, b, nw)

    out, grads = _grads(run, ours_in, dout.cuda())
    eager_out, eager_grads = _grads(ref, ours_in, dout.cuda())
    oracle_out, oracle_grads = _grads(ref, [t.cuda() for t in f64], dout.cuda())
    close_to_oracle(out, eager_out, oracle_out, "out")
    for name, g, ge, go in zip(("d_hidden", "d_weight", "d_bias", "d_norm_weight"), grads, eager_grads,
                               oracle_grads):
        close_to_oracle(g, ge, go, name)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    cu, _, (h, w, b, nw) = _inputs([16] * 64, 256, 256, torch.bfloat16)
    f = torch.compile(lambda *a: segment_mean_proj(*a, check_inputs=False), fullgraph=True)
    torch.testing.assert_close(f(h, cu, w, b, nw), segment_mean_proj(h, cu, w, b, nw))
