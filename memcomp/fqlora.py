"""FQLoRA (seed 002, Appendix I.1): full fine-tuning of uniformly spaced decoder layers, NF4 QLoRA on the rest.

    apply_fqlora(model_or_compressor, FQLoRAConfig())   # in place, per-instance module swaps
    groups = param_groups(model)                        # AdamW groups: LoRA / full-FT / projection
    merge_fqlora(model)                                 # dense model with the LoRA deltas merged
    export_peft(model, "adapter/"); import_peft(model, "adapter/")
    memory_report(model)

Selected layers keep their weights (bf16 in training) and are fully trainable; in every other layer the
target linears become frozen NF4 + trainable LoRA (``FQLoRALinear``, backed by ``memcomp.fused.
nf4_lora_linear``) and everything else in the layer (norms, biases) is frozen. Embeddings, LM head, the
final norm and the compressor's projection are trainable.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from memcomp.nf4 import NF4Weight, nf4_lora_linear, nf4_quantize

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_full_ft_layers(num_layers: int) -> tuple[int, ...]:
    """~36 % of the layers, evenly spaced, first and last included: 0, 3, ..., 27 for 28 layers (Qwen2.5-7B,
    10 layers, as the paper lists them) and 23 of 64 for Qwen2.5-32B."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_layers == 1:
        return (0,)
    k = max(2, round(num_layers * 10 / 28))
    return tuple(sorted({round(i * (num_layers - 1) / (k - 1)) for i in range(k)}))


@dataclass(frozen=True)
class FQLoRAConfig:
    """full_ft_layers: None = ``default_full_ft_layers``; rank / alpha / dropout of the LoRA adapters
    (paper: 64 / 16 / 0.05); target_modules: linear names inside each decoder layer; quantize: NF4 base
    weights (False keeps them dense and frozen: plain LoRA)."""

    full_ft_layers: Optional[tuple[int, ...]] = None
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = TARGETS
    quantize: bool = True
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"FQLoRAConfig.rank must be a positive int, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"FQLoRAConfig.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FQLoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("FQLoRAConfig.target_modules is empty")
        if self.full_ft_layers is not None:
            object.__setattr__(self, "full_ft_layers", tuple(int(i) for i in self.full_ft_layers))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class FQLoRALinear(nn.Module):
    """A frozen base weight (NF4 buffers, or dense when not quantized) plus trainable LoRA A [r, in],
    B [out, r]; B starts at zero so the wrapped layer starts out unchanged (as in peft)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, quantize: bool = True,
                 blocksize: int = 64, double_quant: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.dropout_p, self.quantized = rank, alpha, dropout, quantize
        w = base.weight.detach()
        self.weight_dtype = w.dtype
        if quantize:
            q = nf4_quantize(w, blocksize=blocksize, double_quant=double_quant)
            self.blocksize = blocksize
            for name in ("packed", "absmax", "absmax2", "code2", "offset"):
                self.register_buffer(f"nf4_{name}", getattr(q, name))
        else:
            self.register_buffer("weight", w.clone())
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def nf4(self) -> NF4Weight:
        return NF4Weight(self.nf4_packed, self.nf4_absmax, torch.Size((self.out_features, self.in_features)),
                         self.weight_dtype, self.blocksize, self.nf4_absmax2, self.nf4_code2, self.nf4_offset)

    def base_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The frozen base weight, dense (dequantized when stored as NF4)."""
        dtype = dtype or self.weight_dtype
        return self.nf4().dequantize(dtype) if self.quantized else self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return nf4_lora_linear(x, self.nf4(), self.lora_A, self.lora_B, self.scaling, self.bias,
                                   dropout_p=self.dropout_p, training=self.training)
        lora_in = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        y = F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y + self.scaling * F.linear(F.linear(lora_in, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def extra_repr(self) -> str:
        kind = f"nf4(block={self.blocksize})" if self.quantized else "dense"
        return f"in={self.in_features}, out={self.out_features}, base={kind}, r={self.rank}, alpha={self.alpha}"


# --------------------------------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """(causal LM, compressor projection or None) for a MemoryCompressor or a plain HF causal LM."""
    from memcomp.compressor import MemoryCompressor

    if isinstance(model, MemoryCompressor):
        return model.model, model.projection
    return model, None


def _layers(lm: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(lm, "base_model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"FQLoRA needs a causal LM with decoder layers at model.base_model.layers "
                         f"(Qwen2 / Llama / Mistral families); got {type(lm).__name__}")
    return layers


def apply_fqlora(model: nn.Module, config: Optional[FQLoRAConfig] = None) -> nn.Module:
    """Turn ``model`` (a MemoryCompressor or an HF causal LM) into an FQLoRA model, in place."""
    config = config or FQLoRAConfig()
    lm, projection = _unwrap(model)
    layers = _layers(lm)
    n = len(layers)
    full = config.full_ft_layers if config.full_ft_layers is not None else default_full_ft_layers(n)
    bad = [i for i in full if not 0 <= i < n]
    if bad:
        raise ValueError(f"full_ft_layers {bad} out of range: the model has {n} decoder layers (0..{n - 1})")
    if any(isinstance(m, FQLoRALinear) for m in lm.modules()):
        raise ValueError("apply_fqlora: the model already has FQLoRA layers")
    for p in lm.parameters():
        p.requires_grad_(True)
    for i, layer in enumerate(layers):
        if i in full:
            continue
        found = []
        for name, module in list(layer.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in config.target_modules and isinstance(module, nn.Linear):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, leaf, FQLoRALinear(module, config.rank, config.alpha, config.dropout,
                                                   config.quantize, config.blocksize, config.double_quant))
                found.append(leaf)
        missing = sorted(set(config.target_modules) - set(found))
        if missing:
            raise ValueError(f"layer {i} has no linear named {missing}; target_modules={config.target_modules}")
        for pname, p in layer.named_parameters():
            p.requires_grad_(pname.endswith(("lora_A", "lora_B")))
    if projection is not None:
        for p in projection.parameters():
            p.requires_grad_(True)
    model.fqlora_config = config
    model.fqlora_full_ft_layers = tuple(sorted(full))
    return model


def fqlora_modules(model: nn.Module) -> dict[str, FQLoRALinear]:
    lm, _ = _unwrap(model)
    return {name: m for name, m in lm.named_modules() if isinstance(m, FQLoRALinear)}


def merge_fqlora(model: nn.Module, include_lora: bool = True) -> nn.Module:
    """Replace every FQLoRALinear by a dense nn.Linear holding W + scaling * B A (or just W with
    ``include_lora=False``: the base a PEFT adapter applies to). In place; returns the model."""
    lm, _ = _unwrap(model)
    for name, m in fqlora_modules(model).items():
        with torch.no_grad():
            w = m.base_weight(torch.float32)
            if include_lora:
                w = w + m.scaling * (m.lora_B.float() @ m.lora_A.float())
        dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device,
                          dtype=m.weight_dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if m.bias is not None:
                dense.bias.copy_(m.bias)
        parent_name, leaf = name.rsplit(".", 1)
        setattr(lm.get_submodule(parent_name), leaf, dense)
    for attr in ("fqlora_config", "fqlora_full_ft_layers"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def param_groups(model: nn.Module, lr_lora: float = 1e-4, lr_full: float = 5e-5, lr_proj: float = 3e-4,
                 wd_lora: float = 0.0, wd_full: float = 0.1, wd_proj: float = 0.0) -> list[dict[str, Any]]:
    """AdamW parameter groups as in the paper's Table 9: LoRA adapters, fully fine-tuned parameters
    (selected layers, embeddings, LM head, final norm), the compressor projection. Frozen parameters are
    left out; no parameter is in two groups."""
    lm, projection = _unwrap(model)
    proj_ids = {id(p) for p in projection.parameters()} if projection is not None else set()
    lora, full, proj = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in proj_ids:
            proj.append(p)
        elif name.endswith(("lora_A", "lora_B")):
            lora.append(p)
        else:
            full.append(p)
    groups = [{"name": "lora", "params": lora, "lr": lr_lora, "weight_decay": wd_lora},
              {"name": "full", "params": full, "lr": lr_full, "weight_decay": wd_full},
              {"name": "projection", "params": proj, "lr": lr_proj, "weight_decay": wd_proj}]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------------------
# PEFT interop
# --------------------------------------------------------------------------------------------------

def export_peft(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str = "") -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained``
    loads onto the dense base (``merge_fqlora(model, include_lora=False)``, or the original model)."""
    from safetensors.torch import save_file

    mods = fqlora_modules(model)
    if not mods:
        raise ValueError("export_peft: the model has no FQLoRA layers (apply_fqlora first)")
    first = next(iter(mods.values()))
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    names = sorted(mods)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.rank, "lora_alpha": first.alpha,
        "lora_dropout": first.dropout_p, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        # Exactly the wrapped modules (full-FT layers have no adapter): a full-match regex.
        "target_modules": "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$",
        "base_model_name_or_path": base_model_name_or_path,
    }
    tensors = {}
    for name in names:
        m = mods[name]
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def import_peft(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load a PEFT LoRA adapter (as written by ``export_peft`` or by peft) into the FQLoRA layers."""
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    with open(os.path.join(directory, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{directory}: not a LoRA adapter (peft_type={cfg.get('peft_type')!r})")
    state = load_file(os.path.join(directory, "adapter_model.safetensors"))
    mods = fqlora_modules(model)
    loaded = set()
    for key, value in state.items():
        stem = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in stem:
                name = stem.split(marker)[0]
                if name not in mods:
                    raise ValueError(f"{directory}: adapter weight {key} has no FQLoRA layer {name} in this model")
                m = mods[name]
                if float(cfg["lora_alpha"]) != float(m.alpha) or int(cfg["r"]) != m.rank:
                    raise ValueError(f"{directory}: adapter r={cfg['r']}, alpha={cfg['lora_alpha']} but the "
                                     f"model's layers use r={m.rank}, alpha={m.alpha}")
                target = getattr(m, part)
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(value)
                loaded.add((name, part))
    missing = [n for n in mods if (n, "lora_A") not in loaded or (n, "lora_B") not in loaded]
    if missing:
        raise ValueError(f"{directory}: no adapter weights for {len(missing)} FQLoRA layers, e.g. {missing[0]}")


# --------------------------------------------------------------------------------------------------
# Memory report
# --------------------------------------------------------------------------------------------------

def memory_report(model: nn.Module, optimizer_bytes_per_param: int = 12,
                  print_table: bool = True) -> dict[str, Union[int, float]]:
    """Bytes of frozen NF4 weights, other frozen tensors, trainable parameters, and the optimizer-state
    estimate (AdamW with fp32 moments and an fp32 master copy: 12 bytes per trainable parameter)."""
    mods = fqlora_modules(model)
    nf4 = sum(b.numel() * b.element_size() for m in mods.values() for n, b in m.named_buffers()
              if n.startswith("nf4_") and b is not None)
    frozen_dense = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen_dense += sum(b.numel() * b.element_size() for m in mods.values() for n, b in m.named_buffers()
                        if not n.startswith("nf4_") and b is not None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    report = {
        "frozen_nf4_bytes": nf4, "frozen_dense_bytes": frozen_dense,
        "trainable_params": n_train, "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "lora_params": sum(m.lora_A.numel() + m.lora_B.numel() for m in mods.values()),
        "optimizer_state_bytes": n_train * optimizer_bytes_per_param,
    }
    report["total_bytes"] = (report["frozen_nf4_bytes"] + report["frozen_dense_bytes"] + report["trainable_bytes"]
                             + report["optimizer_state_bytes"])
    if print_table:
        print(f"{'memcomp FQLoRA memory':<34}{'GiB':>10}")
        for key in ("frozen_nf4_bytes", "frozen_dense_bytes", "trainable_bytes", "optimizer_state_bytes",
                    "total_bytes"):
            print(f"  {key:<32}{report[key] / 2**30:>10.3f}")
        print(f"  {'trainable parameters':<32}{n_train / 1e6:>9.2f}M (LoRA {report['lora_params'] / 1e6:.2f}M)")
    return report
