"""nf4_lora_linear: Triton paths (interpreter on CPU) against the eager reference, fp64, and peft."""

import importlib

import pytest
import torch
from testutil import CPU_DTYPES, DEVICE, GPU_DTYPES, HAS_CUDA

from memcomp.fused import nf4_lora_linear, nf4_quantize, use_backend

lin = importlib.import_module("memcomp.kernels.nf4_lora_linear")
DTYPES = GPU_DTYPES if HAS_CUDA else CPU_DTYPES


def _case(M, N, K, r, dtype, bias=True, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    q = nf4_quantize(w.to(DEVICE), double_quant=double_quant)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    A = torch.randn(r, K, generator=g, dtype=torch.float64) / K**0.5
    B = torch.randn(N, r, generator=g, dtype=torch.float64) / r**0.5
    b = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    return q, (x, A, B, b)


def _run(q, tensors, dtype, backend, scaling=0.25, dropout_p=0.0, seed=0):
    leaves = [None if t is None else t.to(DEVICE, dtype).requires_grad_() for t in tensors]
    torch.manual_seed(seed)
    with use_backend(backend):
        y = nf4_lora_linear(leaves[0], q, leaves[1], leaves[2], scaling, leaves[3], dropout_p=dropout_p)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    return y.detach(), list(grads)


SHAPES = [
    pytest.param(1, 24, 70, 8, id="decode-M1"),
    pytest.param(16, 70, 24, 8, id="decode-M16"),
    pytest.param(17, 70, 24, 8, id="train-fold-fwd"),          # K < 2N: forward fold, no backward fold
    pytest.param(40, 24, 70, 8, id="train-fold-bwd"),          # N < 2K: backward fold
    pytest.param(5, 19, 9, 1, id="odd-K-odd-N-rank1"),         # rows not byte-aligned
    pytest.param(33, 33, 65, 64, id="odd-K-rank64"),
]


@pytest.mark.parametrize("M,N,K,r", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_matches_reference(M, N, K, r, dtype, bias, double_quant, close_to_oracle):
    q, tensors = _case(M, N, K, r, dtype, bias, double_quant)
    y, grads = _run(q, tensors, dtype, "triton")
    y_eager, g_eager = _run(q, tensors, dtype, "reference")
    y_oracle, g_oracle = _run(q, tensors, torch.float64, "reference")
    close_to_oracle(y, y_eager, y_oracle, "y")
    for name, a, e, o in zip(("dx", "dA", "dB", "dbias"), grads, g_eager, g_oracle):
        assert a.dtype == dtype, name
        close_to_oracle(a, e, o, name)


@pytest.mark.parametrize("M", [3, 40], ids=["decode", "train"])
def test_dropout_matches_reference_under_the_same_rng(M, close_to_oracle):
    q, tensors = _case(M, 24, 70, 8, torch.float32)
    y, grads = _run(q, tensors, torch.float32, "triton", dropout_p=0.3, seed=5)
    y_ref, g_ref = _run(q, tensors, torch.float32, "reference", dropout_p=0.3, seed=5)
    y_nodrop, _ = _run(q, tensors, torch.float32, "reference", dropout_p=0.0)
    assert not torch.allclose(y_ref, y_nodrop), "dropout had no effect"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_leading_dims_and_eval_mode():
    q, (x, A, B, b) = _case(6, 24, 70, 4, torch.float32)
    x3 = x.float().reshape(2, 3, 70)
    with use_backend("triton"):
        y = nf4_lora_linear(x3, q, A.float(), B.float(), 0.5, b.float(), dropout_p=0.5, training=False)
    assert y.shape == (2, 3, 24)
    with use_backend("reference"):
        ref = nf4_lora_linear(x3, q, A.float(), B.float(), 0.5, b.float())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_parity_with_peft_lora_over_the_dequantized_weight():
    """The same A and B in a peft LoRA layer wrapping a dense Linear with W = dequant(NF4): same outputs
    and the same gradients for x, A and B."""
    peft = pytest.importorskip("peft")
    N, K, r, alpha = 24, 70, 8, 16
    q, (x, A, B, b) = _case(20, N, K, r, torch.float32)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(K, N))
    with torch.no_grad():
        base.proj.weight.copy_(q.dequantize(torch.float32))
        base.proj.bias.copy_(b)
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                                      lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    xp = x.float().clone().requires_grad_()
    y_peft = model(xp)
    y_peft.sum().backward()
    xo, Ao, Bo = (t.float().clone().requires_grad_() for t in (x, A, B))
    with use_backend("triton"):
        y = nf4_lora_linear(xo, q, Ao, Bo, alpha / r, b.float())
    y.sum().backward()
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xo.grad, xp.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Ao.grad, layer.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Bo.grad, layer.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-5)


def test_backward_keeps_no_dequantized_weight():
    """Saved for backward: x (or drop(x)), xa and the packed state -- never a dense [N, K] weight."""
    N, K = 48, 64
    q, (x, A, B, b) = _case(32, N, K, 4, torch.float32)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    leaves = [t.float().requires_grad_() for t in (x, A, B)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), use_backend("triton"):
        y = nf4_lora_linear(leaves[0], q, leaves[1], leaves[2], 0.5)
    assert (N, K) not in [s for s, dt in saved if dt.is_floating_point], saved
    floats = sum(torch.Size(s).numel() for s, dt in saved if dt.is_floating_point and s != (256,))
    assert floats <= 32 * K + 32 * 4 + A.numel() + B.numel() + 8, saved
    y.sum().backward()


def test_opcheck_and_compile():
    q, (x, A, B, b) = _case(20, 24, 70, 4, torch.float32)
    x, A, B, b = (t.float() for t in (x, A, B, b))
    op = torch.ops.memcomp.nf4_lora_linear.default
    for xx, xd in ((x.clone().requires_grad_(), None), (x.clone().requires_grad_(), (x * 2).requires_grad_())):
        args = (xx, xd, q.packed, q.absmax, q.absmax2, q.code2, q.offset, 24, 70, 64, A.clone().requires_grad_(),
                B.clone().requires_grad_(), 0.5, b.clone().requires_grad_())
        torch.library.opcheck(op, args)

    def f(x, A, B):
        return nf4_lora_linear(x, q, A, B, 0.5, b).square().sum()

    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    with use_backend("triton"):
        loss = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
        loss.backward()
        ref = [t.clone().requires_grad_() for t in (x, A, B)]
        expected = f(*ref)
        expected.backward()
    torch.testing.assert_close(loss, expected)
    for a, e in zip(leaves, ref):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    q, (x, A, B, b) = _case(4, 24, 70, 4, torch.float32)
    x, A, B, b = (t.float() for t in (x, A, B, b))
    cases = [
        (dict(lora_A=A[:0], lora_B=B[:, :0]), "r >= 1"),
        (dict(x=x[:, :-1]), "expects K=70"),
        (dict(lora_A=A[:, :-1]), "lora_A must be"),
        (dict(lora_B=B[:-1]), "lora_B must be"),
        (dict(bias=b[:-1]), "bias must be"),
        (dict(x=x.long()), "floating point"),
        (dict(lora_A=A.to("meta")), "lora_A is on meta"),
        (dict(dropout_p=1.0), "dropout_p"),
    ]
    base = dict(x=x, w=q, lora_A=A, lora_B=B, scaling=0.5, bias=b)
    for override, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            nf4_lora_linear(**{**base, **override})


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 4096])
def test_gpu_bf16_qwen_shapes(M, close_to_oracle):
    for N, K in ((512, 3584), (3584, 3584), (18944, 3584), (3584, 18944)):
        q, tensors = _case(M, N, K, 64, torch.bfloat16)
        y, grads = _run(q, tensors, torch.bfloat16, "triton")
        y_eager, g_eager = _run(q, tensors, torch.bfloat16, "reference")
        y_oracle, g_oracle = _run(q, tensors, torch.float64, "reference")
        close_to_oracle(y, y_eager, y_oracle, f"y {N}x{K}")
        for name, a, e, o in zip(("dx", "dA", "dB", "dbias"), grads, g_eager, g_oracle):
            close_to_oracle(a, e, o, f"{name} {N}x{K}")
