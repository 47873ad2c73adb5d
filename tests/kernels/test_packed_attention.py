"""packed_attention: the Triton kernels (interpreter on CPU) against per-segment SDPA, fp64, FlexAttention."""

import importlib

import pytest
import torch
from testutil import DEVICE

from memcomp.fused import packed_attention, use_backend

pa = importlib.import_module("memcomp.kernels.packed_attention")

SEGMENTS = {
    "chunks-16": [16] * 9 + [5],                 # the encoder: many 16-token chunks, a partial last one
    "length-1-and-odd": [1, 7, 1, 33, 1, 2],
    "long-and-short": [90, 3, 16],              # a segment spanning several tiles
}


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _qkv(T, Hq, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, h, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv)]


def _run(tensors, cu, dtype, impl, causal, dout):
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in tensors]
    if impl == "triton":
        with use_backend("triton"):
            out = packed_attention(*leaves, cu, causal=causal)
    else:
        out = pa.packed_attention_reference(*leaves, cu, causal, tensors[0].shape[-1] ** -0.5)
    grads = torch.autograd.grad(out, leaves, dout.to(DEVICE, dtype))
    return out.detach(), list(grads)


CASES = [
    pytest.param("chunks-16", 4, 1, 64, torch.float32, id="gqa4-d64-chunks"),
    pytest.param("length-1-and-odd", 7, 1, 128, torch.float32, id="gqa7-d128-odd"),
    pytest.param("long-and-short", 4, 4, 64, torch.float32, id="mha-d64-long"),
    pytest.param("long-and-short", 8, 2, 128, torch.float32, id="gqa4-d128-long"),
    pytest.param("chunks-16", 4, 4, 64, torch.float16, id="fp16-mha-chunks"),
    pytest.param("length-1-and-odd", 4, 1, 64, torch.float16, id="fp16-gqa4-odd"),
    pytest.param("long-and-short", 2, 1, 200, torch.float32, id="gqa2-d200-long"),  # the D in (128, 256] tiles
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("segments,Hq,Hkv,D,dtype", CASES)
def test_matches_per_segment_sdpa(segments, Hq, Hkv, D, dtype, causal, close_to_oracle):
    lengths = SEGMENTS[segments]
    cu = _cu(lengths)
    tensors = _qkv(sum(lengths), Hq, Hkv, D)
    dout = torch.randn(sum(lengths), Hq, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, grads = _run(tensors, cu, dtype, "triton", causal, dout)
    out_e, grads_e = _run(tensors, cu, dtype, "reference", causal, dout)
    out_o, grads_o = _run(tensors, cu, torch.float64, "reference", causal, dout)
    close_to_oracle(out, out_e, out_o, "out")
    for name, a, e, o in zip(("dq", "dk", "dv"), grads, grads_e, grads_o):
        close_to_oracle(a, e, o, name)


def test_strided_inputs_give_the_contiguous_gradients():
    """q, k, v as views with unit stride in D but other token/head strides (a [H, T, D] tensor transposed, k and v
    slices of one fused projection): the same output and gradients as contiguous copies."""
    lengths = SEGMENTS["length-1-and-odd"]
    T, cu = sum(lengths), _cu(lengths)
    q0, k0, v0 = (t.float().to(DEVICE) for t in _qkv(T, 4, 2, 64))
    dout = torch.randn(T, 4, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    q_base = q0.transpose(0, 1).contiguous().requires_grad_()              # [H, T, D]
    kv_base = torch.cat([k0, v0], dim=1).requires_grad_()                   # [T, 2 Hkv, D]
    with use_backend("triton"):
        q, k, v = q_base.transpose(0, 1), kv_base[:, :2], kv_base[:, 2:]
        assert not q.is_contiguous() and not k.is_contiguous()
        out = packed_attention(q, k, v, cu)
        dq, dkv = torch.autograd.grad(out, (q_base, kv_base), dout)
        leaves = [t.clone().requires_grad_() for t in (q0, k0, v0)]
        out_c = packed_attention(*leaves, cu)
        grads_c = torch.autograd.grad(out_c, leaves, dout)
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    torch.testing.assert_close(dq.transpose(0, 1), grads_c[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dkv, torch.cat(grads_c[1:], dim=1), rtol=1e-6, atol=1e-6)


def test_segments_do_not_leak():
    """Changing one segment's keys and values leaves every other segment's output unchanged."""
    lengths = [16, 16, 16]
    cu = _cu(lengths)
    q, k, v = (t.float().to(DEVICE) for t in _qkv(48, 4, 2, 64))
    with use_backend("triton"):
        before = packed_attention(q, k, v, cu)
        k2, v2 = k.clone(), v.clone()
        k2[16:32] += 5
        v2[16:32] -= 3
        after = packed_attention(q, k2, v2, cu)
    torch.testing.assert_close(after[:16], before[:16], rtol=0, atol=0)
    torch.testing.assert_close(after[32:], before[32:], rtol=0, atol=0)
    assert not torch.allclose(after[16:32], before[16:32])


@pytest.mark.parametrize("causal", [True, False])
def test_flex_attention_backend_agrees(causal):
    lengths = SEGMENTS["length-1-and-odd"]
    cu = _cu(lengths)
    q, k, v = (t.float().to(DEVICE) for t in _qkv(sum(lengths), 4, 2, 64))
    ref = pa.packed_attention_reference(q, k, v, cu, causal, 64 ** -0.5)
    flex = packed_attention(q, k, v, cu, causal=causal, impl="flex")  # forward only on CPU
    torch.testing.assert_close(flex, ref, rtol=1e-5, atol=1e-5)


def test_opcheck_and_compile():
    lengths = [5, 16, 3]
    cu = _cu(lengths)
    q, k, v = (t.float().to(DEVICE).requires_grad_() for t in _qkv(24, 4, 2, 16))
    torch.library.opcheck(torch.ops.memcomp.packed_attention.default, (q, k, v, cu, True, 0.25))

    def f(q, k, v):
        return packed_attention(q, k, v, cu, softmax_scale=0.25).square().sum()

    with use_backend("triton"):
        loss = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
        expected = f(q, k, v)
        expected_grads = torch.autograd.grad(expected, (q, k, v))
    torch.testing.assert_close(loss, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_bad_inputs():
    q, k, v = (t.float() for t in _qkv(10, 4, 2, 16))
    cu = _cu([4, 6]).cpu()
    cases = [
        (dict(q=q[0]), "must be \\[T, H, D\\]"),
        (dict(k=k[:, :1].expand(10, 3, 16).contiguous(), v=v[:, :1].expand(10, 3, 16).contiguous()),
         "not a multiple"),
        (dict(k=k[:9], v=v[:9]), "must be \\[T=10"),
        (dict(cu_seqlens=cu.float()), "int32"),
        (dict(k=k.to("meta"), v=v.to("meta")), "k is on meta"),
        (dict(impl="cudnn"), "impl must be one of"),
        (dict(cu_seqlens=_cu([4, 5]).cpu()), "from 0 to T=10"),
        (dict(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0, 4, 4, 10], dtype=torch.int32)), "is empty"),
    ]
    base = dict(q=q, k=k, v=v, cu_seqlens=cu)
    for override, msg in cases:
        with pytest.raises(ValueError, match=msg):
            packed_attention(**{**base, **override})


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_bf16_qwen_shapes(causal, close_to_oracle):
    for lengths in ([16] * 512, [256, 1024, 4096, 2048, 768]):
        cu = _cu(lengths)
        tensors = _qkv(sum(lengths), 28, 4, 128)
        dout = torch.randn(sum(lengths), 28, 128, dtype=torch.float64)
        out, grads = _run(tensors, cu, torch.bfloat16, "triton", causal, dout)
        out_e, grads_e = _run(tensors, cu, torch.bfloat16, "reference", causal, dout)
        out_o, grads_o = _run(tensors, cu, torch.float32, "reference", causal, dout)
        close_to_oracle(out, out_e, out_o, "out")
        for name, a, e, o in zip(("dq", "dk", "dv"), grads, grads_e, grads_o):
            close_to_oracle(a, e, o, name)


@pytest.mark.gpu
def test_gpu_flash_attn_agrees():
    pytest.importorskip("flash_attn")
    lengths = [16] * 64 + [300, 7]
    cu = _cu(lengths)
    q, k, v = (t.to("cuda", torch.bfloat16) for t in _qkv(sum(lengths), 28, 4, 128))
    with use_backend("triton"):
        ours = packed_attention(q, k, v, cu)
    theirs = packed_attention(q, k, v, cu, max_seqlen=300, impl="flash_attn")
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)



def test_head_dims_above_256_are_refused_by_the_triton_kernels():
    q, k, v = (t.float().to(DEVICE) for t in _qkv(16, 2, 1, 320))
    with use_backend("triton"), pytest.raises(NotImplementedError, match="up to 256"):
        packed_attention(q, k, v, _cu([16]))
