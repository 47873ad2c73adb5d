"""nf4_lora_linear at Qwen2.5-7B projection shapes (K x N = 3584 x 3584, 3584 x 512, 3584 x 18944,
18944 x 3584), bf16, rank 64:
* training, M = 8,192 and 16,384: forward / backward / both, ours against (a) bitsandbytes Linear4bit +
  peft LoRA (dequantize + F.linear + a separate LoRA path, as peft runs it) and (b) a bf16 F.linear + LoRA
  with no quantization (the speed reference); TFLOP/s;
* decode, M = 1, 4, 16, 64: forward against bf16 cuBLAS F.linear; GB/s of weight traffic;
* peak memory of forward + backward through one FQLoRA decoder layer against bitsandbytes + peft.
Targets (H200): training fwd+bwd >= 1.15x (a) and within 1.1x of (b); decode M <= 16 >= 1.5x bf16 cuBLAS;
peak memory no higher than (a). On a CPU: small smoke shapes."""

import functools
import importlib

import pytest
import torch
from benchutil import DEVICE, HAS_CUDA, MODES, Unavailable, mode_callable, per_s
from memcomp.kernels.nf4_lora_linear import release_scratch

from memcomp.fused import nf4_lora_linear, nf4_quantize, use_backend

COLUMNS = ["what", "M", "KxN", "mode", "impl", "median_ms", "p20_ms", "p80_ms", "TFLOP/s", "GB/s",
           "speedup_vs_bnb+peft", "speedup_vs_bf16", "peak_MB"]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
KN = [(3584, 3584), (3584, 512), (3584, 18944), (18944, 3584)] if HAS_CUDA else [(128, 96)]
TRAIN_M = [8192, 16384] if HAS_CUDA else [48]
DECODE_M = [1, 4, 16, 64]
R, ALPHA = 64, 16
WARMUP, RUNS = (5, 50) if HAS_CUDA else (1, 3)
LAYER_WARMUP, LAYER_RUNS = (2, 10) if HAS_CUDA else (1, 2)


def _import(name: str):
    """bitsandbytes and peft: the baseline's packages only, ours runs without them."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise Unavailable(f"{name} not importable ({exc}); pip install 'memcomp[dev]'") from exc


def _bnb_peft_layer(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    """bitsandbytes Linear4bit (NF4, double quant) wrapped in a peft LoRA layer with the same A and B."""
    bnb, peft = _import("bitsandbytes"), _import("peft")
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
    """(forward of x, the LoRA parameters it trains)."""
    if name == "ours":
        def f(x):
            with use_backend("triton"):
                return nf4_lora_linear(x, q, A, B, ALPHA / R)
        return f, [A, B]
    if name == "bnb+peft":
        return _bnb_peft_layer(w, A.detach(), B.detach())
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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("KN", KN, ids=[f"{k}x{n}" for k, n in KN])
@pytest.mark.parametrize("M", TRAIN_M)
def test_training(bench, M, KN, mode):
    """One training shape and mode: ours, bitsandbytes + peft and bf16 + LoRA timed here."""
    K, N = KN
    w, q, A, B, x = _tensors(M, K, N)
    dy = torch.randn(M, N, device=DEVICE, dtype=DTYPE)

    def make(name):
        fn, params = _impl(name, w, q, A, B)
        return mode_callable(mode, lambda: fn(x), [x, *params], dy)

    results = bench.compare({name: functools.partial(make, name) for name in ("bnb+peft", "bf16", "ours")},
                            warmup=WARMUP, runs=RUNS, baselines=["bnb+peft", "bf16"])
    # W is frozen: backward is dX = dY W (2MKN) plus the LoRA path's four rank-r GEMMs (dB, dY B, dA, dU A).
    lora = 2 * M * R * (K + N)
    flops = {"fwd": 2 * M * K * N + lora, "bwd": 2 * M * K * N + 2 * lora, "fwd+bwd": 4 * M * K * N + 3 * lora}[mode]
    for impl, r in results.items():
        bench.add({"what": "train", "M": M, "KxN": f"{K}x{N}", "mode": mode, "impl": impl, **r,
                   "TFLOP/s": per_s(flops / 1e12, r)})


@pytest.mark.parametrize("KN", KN, ids=[f"{k}x{n}" for k, n in KN])
@pytest.mark.parametrize("M", DECODE_M)
def test_decode(bench, M, KN):
    """One decode shape: ours (NF4 + LoRA) against a bf16 cuBLAS F.linear without LoRA."""
    K, N = KN
    w, q, A, B, x = _tensors(M, K, N)

    def bf16():
        @torch.no_grad()
        def run():
            return torch.nn.functional.linear(x, w)
        return run

    def ours():
        @torch.no_grad()
        def run():
            with use_backend("triton"):
                return nf4_lora_linear(x, q, A, B, ALPHA / R)
        return run

    results = bench.compare({"bf16": bf16, "ours": ours}, warmup=WARMUP, runs=RUNS, baselines=["bf16"])
    weight_bytes = {"bf16": N * K * 2, "ours": q.nbytes + R * (K + N) * 2}
    for impl, r in results.items():
        bench.add({"what": "decode", "M": M, "KxN": f"{K}x{N}", "mode": "fwd", "impl": impl, **r,
                   "GB/s": per_s(weight_bytes[impl] / 1e9, r)})


def _bnb_peft_decoder_layer(model):
    """Every linear of the model's one decoder layer as bitsandbytes Linear4bit, with peft LoRA on all seven."""
    bnb, peft = _import("bitsandbytes"), _import("peft")
    layer = model.model.layers[0]
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
    return model.base_model.model.model


def test_decoder_layer_peak_memory(bench):
    """Forward + backward through one Qwen2.5-7B decoder layer (all 7 linears QLoRA, rank 64), 4,096 tokens:
    ours against bitsandbytes + peft, time and peak memory."""
    from memcomp.fqlora import FQLoRAConfig, apply_fqlora
    from memcomp.model_configs import random_model

    name, T = ("qwen2.5-7b", 4096) if HAS_CUDA else ("tiny", 64)

    def make(impl):
        model = random_model(name, device=DEVICE, dtype=DTYPE)
        model.model.layers = model.model.layers[:1]
        model.config.num_hidden_layers = 1
        if impl == "ours":
            apply_fqlora(model, FQLoRAConfig(full_ft_layers=(), dropout=0.0))
            layer_model = model.model
        else:
            layer_model = _bnb_peft_decoder_layer(model)
        emb = torch.randn(1, T, layer_model.config.hidden_size, device=DEVICE, dtype=DTYPE, requires_grad=True)

        def step():
            out = layer_model(inputs_embeds=emb).last_hidden_state
            out.float().square().mean().backward()
        return step

    # Our reused dequantization buffers are dropped before the peak is taken, so they count in it as
    # bitsandbytes' transient copies do.
    results = bench.compare({"bnb+peft": lambda: make("bnb+peft"), "ours": lambda: make("ours")},
                            warmup=LAYER_WARMUP, runs=LAYER_RUNS, baselines=["bnb+peft"], peak=True,
                            before_peak=release_scratch)
    for impl, r in results.items():
        bench.add({"what": "layer fwd+bwd", "M": T, "KxN": name, "mode": "fwd+bwd", "impl": impl, **r})
