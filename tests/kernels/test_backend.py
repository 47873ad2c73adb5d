"""The backend dispatcher: environment variable, context manager, errors."""

import pytest
import torch
from memcomp.kernels import backend


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("MEMCOMP_BACKEND", raising=False)
    assert backend.current_backend() == "auto"


def test_env_var_and_context_manager_nesting(monkeypatch):
    monkeypatch.setenv("MEMCOMP_BACKEND", "reference")
    assert backend.current_backend() == "reference"
    with backend.use_backend("triton"):
        assert backend.current_backend() == "triton"
        with backend.use_backend("auto"):
            assert backend.current_backend() == "auto"
        assert backend.current_backend() == "triton"
    assert backend.current_backend() == "reference"


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="not a memcomp backend"):
        with backend.use_backend("cuda"):
            pass
    monkeypatch.setenv("MEMCOMP_BACKEND", "fast")
    with pytest.raises(ValueError, match="MEMCOMP_BACKEND='fast'"):
        backend.current_backend()


def test_resolution_rules(monkeypatch):
    cpu = torch.zeros(1)
    with backend.use_backend("reference"):
        assert backend.resolve("op", cpu) == "reference"
    with backend.use_backend("auto"):
        assert backend.resolve("op", cpu) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.resolve("op", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with backend.use_backend("triton"):
        assert backend.resolve("op", cpu) == "triton"


# --------------------------------------------------------------------------------------------------
# bf16 in Triton's interpreter: every kernel gives correct values (it computed bf16 tl.dot wrongly: errors of
# ~8e8 in packed_attention and ~8e10 in the NF4 + LoRA decode kernel, with no error raised)
# --------------------------------------------------------------------------------------------------

def _bf16_case(op):
    """(ours in bf16 under the interpreter, eager bf16, fp64 oracle) for one op on a tiny shape."""
    from memcomp.kernels.packed_attention import packed_attention_reference
    from memcomp.kernels.segment_mean_proj import segment_mean_proj_reference

    from memcomp.fused import nf4_dequantize, nf4_lora_linear, nf4_quantize, packed_attention, segment_mean_proj

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)
    bf = torch.bfloat16
    if op == "packed_attention":
        q, k, v = rnd(24, 4, 16), rnd(24, 2, 16), rnd(24, 2, 16)
        cu = torch.tensor([0, 5, 24], dtype=torch.int32)
        run = lambda dt, fn: fn(q.to(dt), k.to(dt), v.to(dt), cu, True, 16 ** -0.5)
        with backend.use_backend("triton"):
            ours = packed_attention(q.to(bf), k.to(bf), v.to(bf), cu)
        return ours, run(bf, packed_attention_reference), run(torch.float64, packed_attention_reference)
    if op == "segment_mean_proj":
        h, w, b, nw = rnd(20, 32), rnd(24, 32) / 6, rnd(24), rnd(32)
        cu = torch.tensor([0, 4, 5, 20], dtype=torch.int32)
        args = lambda dt: (h.to(dt), cu, w.to(dt), b.to(dt), nw.to(dt), 1e-6)
        with backend.use_backend("triton"):
            ours = segment_mean_proj(*args(bf))
        return ours, segment_mean_proj_reference(*args(bf)), segment_mean_proj_reference(*args(torch.float64))
    w = nf4_quantize(rnd(48, 64))
    dense = w.dequantize(torch.float64)
    if op == "nf4_dequantize":
        with backend.use_backend("triton"):
            ours = nf4_dequantize(w, bf)
        return ours, dense.to(bf), dense
    x, A, B, bias = rnd(3, 64), rnd(4, 64) / 8, rnd(48, 4) / 2, rnd(48)
    with backend.use_backend("triton"):  # M = 3 rows: the fused decode kernel
        ours = nf4_lora_linear(x.to(bf), w, A.to(bf), B.to(bf), 0.5, bias.to(bf), training=False)
    eager = lambda dt: (x.to(dt) @ dense.to(dt).T + 0.5 * (x.to(dt) @ A.to(dt).T) @ B.to(dt).T + bias.to(dt))
    return ours, eager(bf), eager(torch.float64)


@pytest.mark.parametrize("op", ["packed_attention", "nf4_lora_linear", "segment_mean_proj", "nf4_dequantize"])
def test_bf16_in_the_interpreter_is_correct(op, close_to_oracle):
    if not backend.interpreter_enabled():
        pytest.skip("runs the kernels in Triton's interpreter")
    ours, eager, oracle = _bf16_case(op)
    assert ours.dtype == torch.bfloat16
    close_to_oracle(ours, eager, oracle, op)


@pytest.mark.parametrize("op", ["packed_attention", "nf4_lora_linear"])
def test_bf16_gradients_in_the_interpreter_are_correct(op, close_to_oracle):
    if not backend.interpreter_enabled():
        pytest.skip("runs the kernels in Triton's interpreter")
    from memcomp.kernels.packed_attention import packed_attention_reference

    from memcomp.fused import nf4_lora_linear, nf4_quantize, packed_attention

    g = torch.Generator().manual_seed(1)
    if op == "packed_attention":
        base = [torch.randn(12, 2, 16, generator=g) for _ in range(3)]
        cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        fns = {"ours": lambda q, k, v: packed_attention(q, k, v, cu),
               "ref": lambda q, k, v: packed_attention_reference(q, k, v, cu, True, 16 ** -0.5)}
    else:
        w = nf4_quantize(torch.randn(24, 32, generator=g))
        base = [torch.randn(2, 32, generator=g), torch.randn(4, 32, generator=g) / 4, torch.randn(24, 4, generator=g)]
        dense = w.dequantize(torch.float64)
        fns = {"ours": lambda x, A, B: nf4_lora_linear(x, w, A, B, 0.5, training=False),
               "ref": lambda x, A, B: x @ dense.to(x.dtype).T + 0.5 * (x @ A.T) @ B.T}
    dout = torch.randn(fns["ref"](*[t.double() for t in base]).shape, generator=g)

    def grads(fn, dt):
        ins = [t.to(dt).requires_grad_() for t in base]
        return torch.autograd.grad(fn(*ins), ins, dout.to(dt))

    with backend.use_backend("triton"):
        ours = grads(fns["ours"], torch.bfloat16)
    eager, oracle = grads(fns["ref"], torch.bfloat16), grads(fns["ref"], torch.float64)
    for i, (o, e, r) in enumerate(zip(ours, eager, oracle)):
        close_to_oracle(o, e, r, f"{op} grad {i}")
