"""nf4_lora_linear at Qwen2.5-7B projection shapes (K x N = 3584 x 3584, 3584 x 512, 3584 x 18944,
18944 x 3584), bf16, rank 64:
* training, M = 8,192 and 16,384: forward / backward / both, ours against (a) bitsandbytes Linear4bit +
  peft LoRA (dequantize + F.linear + a separate LoRA path, as peft runs it) and (b) a bf16 F.linear + LoRA
  with no quantization (the speed reference); TFLOP/s;
* decode, M = 1, 4, 16, 64: forward against bf16 cuBLAS F.linear; GB/s of weight traffic;
* peak memory of forward + backward through one FQLoRA decoder layer against bitsandbytes + peft.
Targets (H200): training fwd+bwd >= 1.15x (a) and within 1.1x of (b); decode M <= 16 >= 1.5x bf16 cuBLAS;
peak memory no higher than (a). On a CPU: small smoke shapes."""

import pytest
import torch
from benchutil import HAS_CUDA, ceilings, peak_mb, sync, time_ms
from memcomp.kernels.nf4_lora_linear import release_scratch

from memcomp.fused import nf4_lora_linear, nf4_quantize, use_backend

COLUMNS = ["what", "M", "KxN", "mode", "impl", "median_ms", "TFLOP/s", "GB/s", "speedup", "peak_MB"]
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
KN = [(3584, 3584), (3584, 512), (3584, 18944), (18944, 3584)] if HAS_CUDA else [(128, 96)]
TRAIN_M = [8192, 16384] if HAS_CUDA else [48]
DECODE_M = [1, 4, 16, 64]
R, ALPHA = 64, 16
_baseline: dict = {}


def _bnb_peft_layer(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    """bitsandbytes Linear4bit (NF4, double quant) wrapped in a peft LoRA layer with the same A and B."""
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")

    N, K = w.shape
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=w.dtype, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.detach().cpu().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.to(w.device)
    box = torch.nn.Sequential()
    box.add_module("proj", layer)
    model = peft.get_peft_model(box, peft.LoraConfig(r=A.shape[0], lora_alpha=ALPHA, target_modules=["proj"],
                                                     lora_dropout=0.0))
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(A)
        lora.lora_B["default"].weight.copy_(B)
    lora.to(w.dtype)
    return model, [lora.lora_A["default"].weight, lora.lora_B["default"].weight]


def _impl(name, w, q, A, B):
    if name == "ours":
        def f(x):
            with use_backend("triton"):
                return nf4_lora_linear(x, q, A, B, ALPHA / R)
        return f, [A, B]
    if name == "bnb+peft":
        model, params = _bnb_peft_layer(w, A.detach(), B.detach())
        return model, params
    if name == "bf16":
        def f(x):
            return torch.nn.functional.linear(x, w) + (ALPHA / R) * ((x @ A.t()) @ B.t())
        return f, [A, B]
    raise ValueError(name)


def _tensors(M, K, N):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    w = torch.randn(N, K, device=DEVICE, dtype=DTYPE, generator=g) / K**0.5
    A = (torch.randn(R, K, device=DEVICE, dtype=DTYPE, generator=g) / K**0.5).requires_grad_()
    B = (torch.randn(N, R, device=DEVICE, dtype=DTYPE, generator=g) / R**0.5).requires_grad_()
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_()
    return w, nf4_quantize(w), A, B, x


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["bnb+peft", "bf16", "ours"])
@pytest.mark.parametrize("KN", KN, ids=[f"{k}x{n}" for k, n in KN])
@pytest.mark.parametrize("M", TRAIN_M)
def test_training(benchmark, recorder, M, KN, impl, mode):
    K, N = KN
    w, q, A, B, x = _tensors(M, K, N)
    fn, params = _impl(impl, w, q, A, B)
    dy = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
    inputs = [x, *params]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(x)
    elif mode == "bwd":
        y = fn(x)

        def run():
            return torch.autograd.grad(y, inputs, dy, retain_graph=True)
    else:
        def run():
            return torch.autograd.grad(fn(x), inputs, dy)
    run()
    sync()
    t = time_ms(run)
    benchmark.pedantic(lambda: (run(), sync()), rounds=3, warmup_rounds=1, iterations=1)
    # W is frozen: backward is dX = dY W (2MKN) plus the LoRA path's four rank-r GEMMs (dB, dY B, dA, dU A).
    lora = 2 * M * R * (K + N)
    flops = {"fwd": 2 * M * K * N + lora, "bwd": 2 * M * K * N + 2 * lora, "fwd+bwd": 4 * M * K * N + 3 * lora}[mode]
    key = (M, K, N, mode)
    if impl != "ours":
        _baseline[key + (impl,)] = t["median_ms"]
    row = {"what": "train", "M": M, "KxN": f"{K}x{N}", "mode": mode, "impl": impl, **t,
           "TFLOP/s": flops / (t["median_ms"] * 1e-3) / 1e12,
           "speedup": (_baseline.get(key + ("bnb+peft",), float("nan")) / t["median_ms"]) if impl == "ours" else None}
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
    recorder.append(row)


@pytest.mark.parametrize("impl", ["bf16", "ours"])
@pytest.mark.parametrize("KN", KN, ids=[f"{k}x{n}" for k, n in KN])
@pytest.mark.parametrize("M", DECODE_M)
def test_decode(benchmark, recorder, M, KN, impl):
    K, N = KN
    w, q, A, B, x = _tensors(M, K, N)
    if impl == "bf16":
        fn = lambda: torch.nn.functional.linear(x, w)
    else:
        def fn():
            with use_backend("triton"):
                return nf4_lora_linear(x, q, A, B, ALPHA / R)
    with torch.no_grad():
        fn()
        sync()
        t = time_ms(fn)
        benchmark.pedantic(lambda: (fn(), sync()), rounds=3, warmup_rounds=1, iterations=1)
    weight_bytes = N * K * 2 if impl == "bf16" else q.nbytes + R * (K + N) * 2
    key = ("decode", M, K, N)
    if impl == "bf16":
        _baseline[key] = t["median_ms"]
    row = {"what": "decode", "M": M, "KxN": f"{K}x{N}", "mode": "fwd", "impl": impl, **t,
           "GB/s": weight_bytes / (t["median_ms"] * 1e-3) / 1e9,
           "speedup": _baseline.get(key, float("nan")) / t["median_ms"] if impl == "ours" else None}
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
    recorder.append(row)


@pytest.mark.parametrize("impl", ["bnb+peft", "ours"])
def test_decoder_layer_peak_memory(benchmark, recorder, impl):
    """Forward + backward through one Qwen2.5-7B decoder layer (all 7 linears QLoRA, rank 64), 4,096 tokens."""
    from memcomp.fqlora import FQLoRAConfig, apply_fqlora
    from memcomp.model_configs import random_model

    name, T = ("qwen2.5-7b", 4096) if HAS_CUDA else ("tiny", 64)
    model = random_model(name, device=DEVICE, dtype=DTYPE)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    layer_model = model.model
    if impl == "ours":
        apply_fqlora(model, FQLoRAConfig(full_ft_layers=(), dropout=0.0))
    else:
        bnb = pytest.importorskip("bitsandbytes")
        peft = pytest.importorskip("peft")

        layer = layer_model.layers[0]
        for parent in (layer.self_attn, layer.mlp):
            for child, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=DTYPE, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(lin.weight.detach().cpu().clone(), requires_grad=False,
                                                 quant_type="nf4", compress_statistics=True)
                    if lin.bias is not None:
                        q.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
                    setattr(parent, child, q.to(DEVICE))
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=R, lora_alpha=ALPHA, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        model.to(DTYPE)
        layer_model = model.base_model.model.model
    emb = torch.randn(1, T, layer_model.config.hidden_size, device=DEVICE, dtype=DTYPE, requires_grad=True)

    def step():
        out = layer_model(inputs_embeds=emb).last_hidden_state
        out.float().square().mean().backward()

    step()
    t = time_ms(step, warmup=1, rep=5)
    release_scratch()  # our reused dequantization buffers count in the peak, as bitsandbytes' transient copies do
    if HAS_CUDA:
        torch.cuda.empty_cache()
    peak = peak_mb(step)
    benchmark.pedantic(step, rounds=1, warmup_rounds=0, iterations=1)
    row = {"what": "layer fwd+bwd", "M": T, "KxN": name, "mode": "fwd+bwd", "impl": impl, **t, "peak_MB": peak}
    if HAS_CUDA:
        row.update(ceilings())
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
    recorder.append(row)
