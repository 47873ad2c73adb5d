"""NF4 storage against bitsandbytes itself: packed bytes, absmax state, dequantization, interop."""

import importlib

import pytest
import torch

from memcomp.fused import NF4Weight, nf4_dequantize, nf4_quantize, use_backend

bnbF = pytest.importorskip("bitsandbytes.functional")  # the reference library (in the dev extra)
_dequantize_4bit_compute = pytest.importorskip("bitsandbytes.backends.default.ops")._dequantize_4bit_compute

nf4k = importlib.import_module("memcomp.kernels.nf4_dequantize")

SHAPES = [(64, 128), (40, 160), (7, 9), (3, 130), (1, 1), (33, 96)]
QUANT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(shape, dtype, seed=0, zero_row=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * (0.01 + torch.rand(shape[0], 1, generator=g))
    if zero_row:
        w[0] = 0
    return w.to(dtype)


def _nested_codes_match(ours: torch.Tensor, theirs: torch.Tensor, absmax: torch.Tensor) -> None:
    """Equal, except where bitsandbytes' native CPU quantizer (which is not exactly nearest: it rounds
    through an approximate reciprocal and a coarse search near zero) picks another code. There, our code
    must be at least as close to the value, the two decoded values within 2^-12 of each other (in units of
    the 256-block's absmax), and such places rare."""
    bad = ours != theirs
    if not bad.any():
        return
    code2 = nf4k.dynamic_map()
    centred = absmax - absmax.mean()
    blocks = torch.nn.functional.pad(centred, (0, (-centred.numel()) % 256)).reshape(-1, 256)
    scaled = (blocks / blocks.abs().amax(1, keepdim=True)).reshape(-1)[: centred.numel()]
    ours_v, theirs_v, x = code2[ours.long()][bad], code2[theirs.long()][bad], scaled[bad]
    assert ((ours_v - x).abs() <= (theirs_v - x).abs()).all(), "our nested code is not the nearest"
    near_midpoint = (x - (ours_v + theirs_v) / 2).abs() < 2**-13
    both_close = (theirs_v - x).abs() < 2**-12
    assert (near_midpoint | both_close).all(), "nested codes differ by more than rounding"
    assert bad.float().mean() < 0.02


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(nf4k.dynamic_map(), bnbF.create_dynamic_map())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", QUANT_DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 32, 128])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_quantize_is_byte_compatible(shape, dtype, blocksize, double_quant):
    w = _weight(shape, dtype, seed=hash((shape, blocksize)) % 1000, zero_row=shape[0] > 8)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                       compress_statistics=double_quant)
    q = nf4_quantize(w, blocksize=blocksize, double_quant=double_quant)
    assert q.shape == w.shape and q.dtype == dtype and q.nested == double_quant
    assert torch.equal(q.packed, packed.reshape(-1)), "packed NF4 bytes differ from bitsandbytes'"
    if double_quant:
        assert torch.equal(q.offset, state.offset)
        assert torch.equal(q.absmax2, state.state2.absmax)
        assert torch.equal(q.code2, state.state2.code)
        _, raw_absmax = nf4k.nf4_quantize_reference(w, blocksize)
        _nested_codes_match(q.absmax, state.absmax, raw_absmax)
    else:
        assert torch.equal(q.absmax, state.absmax)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=str)
def test_dequantize_equals_bitsandbytes(shape, double_quant, out_dtype):
    """Given bitsandbytes' own state, our reference and our Triton kernel decode it bit for bit like
    bitsandbytes' generic implementation; its native CPU kernel agrees wherever rows hold whole blocks
    (all real model shapes) -- it mis-indexes absmax when a block straddles two rows (e.g. 40 x 160)."""
    w = _weight(shape, out_dtype, seed=7)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = NF4Weight.from_bnb(packed, state)
    absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
    generic = _dequantize_4bit_compute(packed.reshape(-1), absmax, state.code, 64, shape, out_dtype)
    with use_backend("reference"):
        ref = q.dequantize(out_dtype)
    with use_backend("triton"):
        tri = q.dequantize(out_dtype)
    assert torch.equal(ref, generic)
    assert torch.equal(tri, generic)
    if shape[1] % 64 == 0 or shape[0] == 1:
        assert torch.equal(ref, bnbF.dequantize_4bit(packed, state).to(out_dtype))


def test_from_bnb_to_bnb_round_trip():
    w = _weight((48, 192), torch.bfloat16)
    for dq in (False, True):
        q = nf4_quantize(w, double_quant=dq)
        packed, state = q.to_bnb()
        back = NF4Weight.from_bnb(packed, state)
        for a, b in zip(q.tensors(), back.tensors()):
            assert torch.equal(a, b)
        assert torch.equal(bnbF.dequantize_4bit(packed, state), q.dequantize())
        # And bitsandbytes' own output survives from_bnb -> to_bnb unchanged.
        bp, bs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        p2, s2 = NF4Weight.from_bnb(bp, bs).to_bnb()
        assert torch.equal(p2, bp) and torch.equal(s2.absmax, bs.absmax)
        assert torch.equal(bnbF.dequantize_4bit(p2, s2), bnbF.dequantize_4bit(bp, bs))


def test_quantization_error_is_nf4_sized():
    w = torch.randn(256, 256)
    q = nf4_quantize(w)
    rel = (q.dequantize() - w).norm() / w.norm()
    assert 0.05 < rel < 0.12  # NF4 on Gaussian weights: ~9 %


def test_facade_dequantize_and_scratch_buffer():
    w = _weight((16, 64), torch.float32)
    q = nf4_quantize(w)
    scratch = torch.empty(16, 64)
    with use_backend("triton"):
        out = q.dequantize(torch.float32, out=scratch)
    assert out.data_ptr() == scratch.data_ptr()
    torch.testing.assert_close(nf4_dequantize(q, torch.float32), out, rtol=0, atol=0)


def test_dequantize_into_a_row_strided_view():
    """The fused linear dequantizes W into the left columns of a wider [N, K + r] buffer."""
    w = _weight((12, 70), torch.float32)
    q = nf4_quantize(w)
    wide = torch.full((12, 70 + 5), float("nan"))
    with use_backend("triton"):
        q.dequantize(torch.float32, out=wide[:, :70])
    assert torch.equal(wide[:, :70], q.dequantize(torch.float32))
    assert torch.isnan(wide[:, 70:]).all(), "wrote outside the view"


def test_dequantize_to_more_than_two_dims():
    """Any dense shape (a stacked [experts, N, K] weight, say); a strided view must be 2-D and is refused
    otherwise (it used to be indexed with the first stride and wrote past the buffer)."""
    w = _weight((6, 64), torch.float32)
    q = nf4_quantize(w)
    flat = q.dequantize(torch.float32)
    with use_backend("triton"):
        out = nf4k.nf4_dequantize(q.packed, q.absmax, (2, 3, 64), 64, torch.float32, q.absmax2, q.code2, q.offset)
        assert torch.equal(out.reshape(6, 64), flat)
        wide = torch.full((2, 4, 64), float("nan"))
        with pytest.raises(ValueError, match="2-D view"):
            nf4k.nf4_dequantize(q.packed, q.absmax, (2, 3, 64), 64, torch.float32, q.absmax2, q.code2, q.offset,
                                out=wide[:, :3])
    assert torch.isnan(wide).all()


def test_code_table_is_copied_once_and_never_from_a_trace():
    from torch._subclasses.fake_tensor import FakeTensorMode

    nf4k._CODE_TABLES.clear()
    with FakeTensorMode():
        nf4k.code_table(torch.device("cpu"))
    assert not nf4k._CODE_TABLES
    first = nf4k.code_table(torch.device("cpu"))
    assert nf4k.code_table(torch.device("cpu")) is first and torch.equal(first, nf4k.NF4_CODE)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        nf4_quantize(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        nf4_quantize(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        nf4_quantize(torch.randn(4, 64), blocksize=48)
    q = nf4_quantize(torch.randn(8, 64), double_quant=False)
    with pytest.raises(ValueError, match="absmax values"):
        nf4k.nf4_dequantize(q.packed, q.absmax[:-1], (8, 64), 64, torch.float32)
    with pytest.raises(ValueError, match="packed bytes"):
        nf4k.nf4_dequantize(q.packed[:-1], q.absmax, (8, 64), 64, torch.float32)
    with pytest.raises(ValueError, match="absmax is on meta"):
        nf4k.nf4_dequantize(q.packed, q.absmax.to("meta"), (8, 64), 64, torch.float32)
    with pytest.raises(ValueError, match="nested absmax"):
        nf4k.nf4_dequantize(q.packed, q.absmax.to(torch.uint8), (8, 64), 64, torch.float32)


def test_bad_out_buffers_are_refused_by_both_implementations():
    """The reference path checks out= as the kernel's launcher does (it used to copy_ into any broadcastable or
    other-dtype buffer, casting silently)."""
    q = nf4_quantize(torch.randn(8, 64))
    for backend in ("reference", "triton"):
        with use_backend(backend):
            for bad, msg in ((torch.empty(8, 64, dtype=torch.float16), "out must be \\(8, 64\\) torch.float32"),
                             (torch.empty(1, 64), "out must be \\(8, 64\\)"),
                             (torch.empty(64, 8).t(), "unit stride")):
                with pytest.raises(ValueError, match=msg):
                    q.dequantize(torch.float32, out=bad)
            with pytest.raises(TypeError, match="floating dtype"):
                q.dequantize(torch.int32)
            with pytest.raises(ValueError, match="non-negative"):
                nf4k.nf4_dequantize(q.packed, q.absmax, (-8, -64), 64, torch.float32)


# -- the custom ops: opcheck, torch.compile, no gradient ---------------------------------------------------

def _op_args(double_quant, shape=(7, 9)):
    q = nf4_quantize(_weight(shape, torch.float32, seed=3), double_quant=double_quant)
    return q, (q.packed, q.absmax, q.absmax2, q.code2, q.offset)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_opcheck(impl, double_quant):
    """Both ops, both implementations (the Triton kernel runs in the interpreter on a CPU): schema, fake tensors,
    the declared mutation of out=, and that neither claims a gradient."""
    q, state = _op_args(double_quant)
    for shape, dtype in (((7, 9), torch.float32), ((63,), torch.float16)):
        torch.library.opcheck(torch.ops.memcomp.nf4_dequantize.default, (*state, list(shape), 64, dtype, impl))
    torch.library.opcheck(torch.ops.memcomp.nf4_dequantize_into.default, (*state, 64, impl, torch.empty(7, 9)))
    wide = torch.zeros(7, 12, dtype=torch.float16)
    torch.library.opcheck(torch.ops.memcomp.nf4_dequantize_into.default, (*state, 64, impl, wide[:, :9]))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph_with_and_without_out(backend):
    q, _ = _op_args(True, (12, 70))
    expected = q.dequantize(torch.float32)

    def fresh(scale):
        return q.dequantize(torch.float32) * scale

    def into_view(wide):  # the fused linear's pattern: W into the left columns of [W | B]
        q.dequantize(torch.float32, out=wide[:, :70])
        return wide.sum()

    with use_backend(backend):
        torch.testing.assert_close(torch.compile(fresh, backend="aot_eager", fullgraph=True)(2.0), expected * 2,
                                   rtol=0, atol=0)
        wide = torch.full((12, 75), 1.0)
        total = torch.compile(into_view, backend="aot_eager", fullgraph=True)(wide)
    assert torch.equal(wide[:, :70], expected), "the compiled graph did not write into the caller's buffer"
    assert (wide[:, 70:] == 1.0).all()
    torch.testing.assert_close(total, expected.sum() + 12 * 5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_gradient_through_the_frozen_weight(backend):
    """The weight is frozen; a backward through the dequantized weight's state is an error, never a silent 0."""
    q, _ = _op_args(True)
    absmax2 = q.absmax2.clone().requires_grad_()
    with use_backend(backend):
        w = nf4k.nf4_dequantize(q.packed, q.absmax, (7, 9), 64, torch.float32, absmax2, q.code2, q.offset)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        w.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
def test_gpu_bf16_matches_bitsandbytes_cuda(double_quant):
    w = torch.randn(3584, 3584, device="cuda", dtype=torch.bfloat16)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = nf4_quantize(w, double_quant=double_quant)
    assert torch.equal(q.packed, packed.reshape(-1))
    if double_quant:
        assert torch.equal(q.offset, state.offset) and torch.equal(q.absmax2, state.state2.absmax)
        _, raw_absmax = nf4k.nf4_quantize_reference(w, 64)
        _nested_codes_match(q.absmax.cpu(), state.absmax.cpu(), raw_absmax.cpu())
    else:
        assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(NF4Weight.from_bnb(packed, state).dequantize(), bnbF.dequantize_4bit(packed, state))

