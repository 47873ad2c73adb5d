"""FQLoRA (seed 002, Appendix I.1): full fine-tuning of uniformly spaced decoder layers, NF4 QLoRA on the rest.

    apply_fqlora(model_or_compressor, FQLoRAConfig())   # in place, per-instance module swaps
    groups = param_groups(model)                        # AdamW groups: LoRA / full-FT / projection
    merge_fqlora(model)                                 # dense model with the LoRA deltas merged
    export_peft(model, "adapter/"); import_peft(model, "adapter/")
    merged_state_dict(model)                            # what save_pretrained writes for an FQLoRA model
    memory_report(model)

Selected layers keep their weights (bf16 in training) and are fully trainable; in every other layer the
target linears become frozen NF4 + trainable LoRA (``FQLoRALinear``, backed by ``memcomp.fused.
nf4_lora_linear``) and everything else in the layer (norms, biases) is frozen. Embeddings, LM head, the
final norm and the compressor's projection are trainable. LoRA scales ``B A`` by ``alpha / r``, or by
``alpha / sqrt(r)`` with ``use_rslora`` (rank-stabilized LoRA, Kalajdzievski 2023, as peft's ``use_rslora``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
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
    (paper: 64 / 16 / 0.05); use_rslora: scale by alpha / sqrt(rank) instead of alpha / rank (peft's
    ``use_rslora``); target_modules: linear names inside each decoder layer; quantize: NF4 base weights
    (False keeps them dense and frozen: plain LoRA)."""

    full_ft_layers: Optional[tuple[int, ...]] = None
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = TARGETS
    quantize: bool = True
    blocksize: int = 64
    double_quant: bool = True
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"FQLoRAConfig.rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"FQLoRAConfig.use_rslora must be a bool, got {self.use_rslora!r}")
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
        return lora_scaling(self.rank, self.alpha, self.use_rslora)


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """The factor on ``B A``: ``alpha / rank``, or ``alpha / sqrt(rank)`` for rank-stabilized LoRA (the
    two rules of peft's ``LoraLayer.update_layer``)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class FQLoRALinear(nn.Module):
    """A frozen base weight (NF4 buffers, or dense when not quantized) plus trainable LoRA A [r, in],
    B [out, r]; B starts at zero so the wrapped layer starts out unchanged (as in peft). The output is
    ``x W^T + bias + scaling * dropout(x) A^T B^T`` with ``scaling = lora_scaling(rank, alpha, use_rslora)``.
    Raises ValueError for a non-positive rank or alpha, a dropout outside [0, 1) or a non-bool use_rslora."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, quantize: bool = True,
                 blocksize: int = 64, double_quant: bool = True, *, use_rslora: bool = False) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"FQLoRALinear: rank must be a positive int, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"FQLoRALinear: alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"FQLoRALinear: dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(use_rslora, bool):
            raise ValueError(f"FQLoRALinear: use_rslora must be a bool, got {use_rslora!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.dropout_p, self.quantized = rank, alpha, dropout, quantize
        self.use_rslora = use_rslora
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
        return lora_scaling(self.rank, self.alpha, self.use_rslora)

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
        return (f"in={self.in_features}, out={self.out_features}, base={kind}, r={self.rank}, alpha={self.alpha}"
                + (", rslora" if self.use_rslora else ""))


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
                lora = FQLoRALinear(module, config.rank, config.alpha, config.dropout, config.quantize,
                                    config.blocksize, config.double_quant, use_rslora=config.use_rslora)
                setattr(parent, leaf, lora.train(module.training))  # an eval model stays eval: no LoRA dropout
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
    if len(set(full)) == n:
        warnings.warn(f"apply_fqlora: all {n} decoder layers are fully fine-tuned (full_ft_layers={tuple(sorted(full))}"
                      "), so no layer gets NF4 + LoRA: this is plain full fine-tuning. Pass full_ft_layers= to "
                      "choose the fully trained layers (the default picks ~36 %, first and last included, which is "
                      "every layer of a model this small)", UserWarning, stacklevel=2)
    return model


def fqlora_modules(model: nn.Module) -> dict[str, FQLoRALinear]:
    lm, _ = _unwrap(model)
    return {name: m for name, m in lm.named_modules() if isinstance(m, FQLoRALinear)}


def _dense_weight(m: FQLoRALinear, include_lora: bool = True) -> torch.Tensor:
    """W (dequantized when NF4) + scaling * B A, summed in fp32 and stored in the layer's weight dtype."""
    with torch.no_grad():
        w = m.base_weight(torch.float32)
        if include_lora:
            w = w + m.scaling * (m.lora_B.float() @ m.lora_A.float())
    return w.to(m.weight_dtype)


def merge_fqlora(model: nn.Module, include_lora: bool = True) -> nn.Module:
    """Replace every FQLoRALinear by a dense nn.Linear holding W + scaling * B A (``scaling`` as the layer
    computes it, rsLoRA included; W dequantized when stored as NF4), or just W with ``include_lora=False``
    (a base that ``export_peft``'s adapter reproduces the model on exactly, see there). Nothing else
    changes: full-FT layers, embeddings, LM head, final norm and the compressor projection keep their
    trained values. In place; returns the model."""
    lm, _ = _unwrap(model)
    for name, m in fqlora_modules(model).items():
        w = _dense_weight(m, include_lora)
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


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The causal LM's state dict as ``merge_fqlora(model)`` would leave it, without changing ``model``.

    Each FQLoRALinear ``<name>`` appears as ``<name>.weight`` (W + scaling * B A, as ``merge_fqlora``) and
    ``<name>.bias`` instead of its NF4 buffers and LoRA factors: transformers' ``from_pretrained`` drops
    those as unexpected keys and initializes the missing ``weight`` at random, so a checkpoint of an FQLoRA
    model must be written from this (``MemoryCompressor.save_pretrained`` does). Every other entry is the
    model's own tensor, not a copy. A MemoryCompressor gives the state dict of its causal LM
    (``comp.model``); its projection is not part of it (``save_pretrained`` writes that to its own file).
    A model without FQLoRA layers gives its plain ``state_dict()``.
    """
    lm, _ = _unwrap(model)
    state = lm.state_dict()
    for name, m in fqlora_modules(model).items():
        prefix = name + "."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state[prefix + "weight"] = _dense_weight(m)
        if m.bias is not None:
            state[prefix + "bias"] = m.bias.detach()
    return state


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

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A PeftModel names the wrapped causal LM's tensors under this prefix in adapter files.
_PEFT_PREFIX = "base_model.model."

# How import_peft treats every field of peft's LoraConfig (peft 0.21; tests check the installed peft has no
# field missing from these three tables). Metadata: describes the file, not the function the adapter computes.
PEFT_METADATA_FIELDS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "runtime_config"})
# Implemented: r / lora_alpha / use_rslora must equal the model's layers; lora_dropout is a training setting of
# the importing model; the adapter's weights decide which layers have LoRA (target_modules, exclude_modules);
# modules_to_save and ensure_weight_tying are loaded as peft loads them; init_lora_weights / eva_config only
# choose starting values, unless the method also rewrites the base weights (refused below).
PEFT_IMPLEMENTED_FIELDS = frozenset({
    "r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
    "ensure_weight_tying", "init_lora_weights", "eva_config"})
# Refused, by name, unless at peft's default: each changes the adapter's function or the base it applies to.
PEFT_UNSUPPORTED_FIELDS: dict[str, Any] = {
    "fan_in_fan_out": False, "bias": "none", "lora_bias": False, "use_dora": False, "rank_pattern": {},
    "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
    "target_parameters": None, "trainable_token_indices": None, "megatron_config": None,
    "megatron_core": "megatron.core", "loftq_config": {}, "corda_config": None, "lora_ga_config": None,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
    "monteclora_config": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None}
# init_lora_weights values that only set the starting A and B; pissa*, olora, corda, loftq and lora_ga also
# rewrite the base weights (the adapter then needs that residual base), mica is a LoRA variant.
_PEFT_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def _is_off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and len(value) == 0)


def _read_lora_config(cfg: Any, where: str) -> dict[str, Any]:
    """Check an adapter_config.json against what FQLoRA implements; return r, alpha, use_rslora,
    modules_to_save, ensure_weight_tying. Raises ValueError naming every field it cannot honour."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: {ADAPTER_CONFIG} holds {type(cfg).__name__}, not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{where}: not a LoRA adapter (peft_type={cfg.get('peft_type')!r})")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{where}: task_type={cfg['task_type']!r}; FQLoRA adapters are for causal LMs (CAUSAL_LM)")
    refused = []
    for key, value in cfg.items():
        if key in PEFT_METADATA_FIELDS or key in PEFT_IMPLEMENTED_FIELDS:
            continue
        if key in PEFT_UNSUPPORTED_FIELDS:
            default = PEFT_UNSUPPORTED_FIELDS[key]
            if not (value == default or (_is_off(value) and _is_off(default))):
                refused.append(f"{key}={value!r}")
        elif not _is_off(value):
            refused.append(f"{key}={value!r} (a LoraConfig field memcomp does not know)")
    init = cfg.get("init_lora_weights", True)
    if not any(init is v if isinstance(v, bool) else init == v for v in _PEFT_PLAIN_INITS):
        refused.append(f"init_lora_weights={init!r} (it rewrites the base weights or changes the forward)")
    if refused:
        raise ValueError(f"{where}: FQLoRA does not implement {', '.join(refused)}; only plain (rs)LoRA on "
                         "linear layers, with modules_to_save, can be imported")
    r, alpha, rslora = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("use_rslora", False)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}: r={r!r} is not a positive int")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{where}: lora_alpha={alpha!r} is not a positive number")
    if not isinstance(rslora, bool):
        raise ValueError(f"{where}: use_rslora={rslora!r} is not a bool")
    to_save = cfg.get("modules_to_save") or []
    if not isinstance(to_save, (list, tuple)) or not all(isinstance(e, str) and e for e in to_save):
        raise ValueError(f"{where}: modules_to_save={to_save!r} is not a list of module names")
    return {"r": r, "alpha": float(alpha), "use_rslora": rslora, "modules_to_save": list(to_save),
            "ensure_weight_tying": bool(cfg.get("ensure_weight_tying", False))}


def _peft_selected(entry: str, lm: nn.Module) -> list[str]:
    """The modules of ``lm`` that peft wraps for the ``modules_to_save`` entry ``entry``: those whose name
    inside the PeftModel ends with it, as a plain string suffix (peft's ``_set_trainable``)."""
    names = []
    for name, _ in lm.named_modules(remove_duplicate=False):
        full = _PEFT_PREFIX + name if name else _PEFT_PREFIX[:-1]
        if full.endswith(entry):
            names.append(name)
    return names


def _frozen_by_fqlora(lm: nn.Module) -> set[int]:
    """ids of the tensors FQLoRA keeps at their original values: in every decoder layer with FQLoRA
    layers (a QLoRA layer), the buffers (NF4 codes, dense frozen weights, biases) and frozen parameters."""
    frozen: set[int] = set()
    for layer in _layers(lm):
        if any(isinstance(m, FQLoRALinear) for m in layer.modules()):
            frozen.update(id(b) for b in layer.buffers())
            frozen.update(id(p) for p in layer.parameters() if not p.requires_grad)
    return frozen


def _trained_modules(lm: nn.Module, mods: dict[str, FQLoRALinear]) -> list[str]:
    """The modules ``export_peft`` writes whole, as peft ``modules_to_save``: the largest modules that hold
    no FQLoRA layer and some tensor FQLoRA does not keep frozen. For the default transform: every full-FT
    decoder layer (one entry each), the input embeddings, the LM head and the final norm; also any
    parameter of a QLoRA layer made trainable after ``apply_fqlora``."""
    frozen = _frozen_by_fqlora(lm)
    state = lm.state_dict(keep_vars=True)

    def inside(key: str, scope: str) -> bool:
        return not scope or key.startswith(scope + ".")

    trained = {k for k, v in state.items() if id(v) not in frozen and not any(inside(k, n) for n in mods)}
    out: list[str] = []

    def visit(name: str, module: nn.Module) -> None:
        keys = [k for k in state if inside(k, name)]
        if not any(k in trained for k in keys):
            return
        if not any(inside(n, name) for n in mods):
            out.append(name)
            return
        own = [k for k in keys if k in trained and "." not in (k[len(name) + 1:] if name else k)]
        if own:
            raise ValueError(f"export_peft: {name or 'the model'} holds trained tensors {own} beside FQLoRA layers; "
                             "peft's modules_to_save saves whole modules, so these cannot be exported")
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    visit("", lm)
    return out


def _embeddings_tied(lm: nn.Module) -> bool:
    head = lm.get_output_embeddings()
    return head is not None and head.weight is lm.get_input_embeddings().weight


def export_peft(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str = "") -> None:
    """Write a peft LoRA adapter that reproduces the FQLoRA model on the model it was made from.

    Written to ``directory``:

    - ``adapter_config.json``: r, lora_alpha, use_rslora, lora_dropout of the FQLoRA layers (which must all
      agree); ``target_modules`` a full-match regex naming exactly the FQLoRA layers; ``modules_to_save``
      the modules FQLoRA trains whole (``_trained_modules``: each full-FT decoder layer with its norms and
      biases, the input embeddings including the MEM rows, the LM head, the final norm); for tied embeddings
      ``ensure_weight_tying=True`` as well (peft >= 0.18 then keeps the two copies tied; 0.13 to 0.17 drop
      that field with a warning and load two equal copies, which give the same outputs).
    - ``adapter_model.safetensors``: ``base_model.model.<layer>.lora_A.weight`` [r, in] and ``lora_B.weight``
      [out, r] per FQLoRA layer, and every state-dict tensor of each ``modules_to_save`` module under
      ``base_model.model.<module>.<tensor>``, in the model's dtypes.
    - for a MemoryCompressor, ``memcomp_projection.safetensors``: the compressor's projection (``weight``
      [d, d], ``bias`` [d]), which lives outside the causal LM and which peft therefore never sees.
      ``import_peft`` restores it; without it, build the compressor as ``MemoryCompressor(peft_model.
      merge_and_unload(), tokenizer, config, projection)`` with the projection loaded from this file. A
      stale projection file from an earlier export of a compressor is removed when a plain LM is exported.

    ``peft.PeftModel.from_pretrained(base, directory)`` must get, as ``base``, the causal LM as
    ``apply_fqlora`` found it: for a compressor, ``comp.model`` right after ``MemoryCompressor.from_base``
    (its vocabulary includes <MEM_START>/<MEM_END>: ``len(tokenizer)`` rows; e.g. saved then with
    ``comp.save_pretrained`` and loaded with ``AutoModelForCausalLM.from_pretrained``). The QLoRA layers'
    frozen tensors (base weights, biases, norms) are the only part of ``base`` the adapter does not carry.
    A base with another vocabulary size is refused by peft (a size mismatch for the embeddings); resize it
    to the adapter's row count first (``base.resize_token_embeddings(n)``; the adapter supplies every row).
    With ``quantize=True``
    the trained model computes the QLoRA layers from NF4-dequantized weights, peft on the dense base from the
    original ones: the outputs differ by that quantization error, as for any QLoRA adapter. An exact base is
    ``merge_fqlora(apply_fqlora(copy.deepcopy(base), config), include_lora=False)`` (NF4 rounding is
    deterministic), or ``merge_fqlora(copy.deepcopy(model), include_lora=False)``. peft keeps a frozen copy of
    each ``modules_to_save`` module beside the trained one; ``merge_and_unload()`` leaves a plain model.

    Raises ValueError when the model has no FQLoRA layers, when its FQLoRA layers differ in r / alpha /
    dropout / use_rslora (one adapter_config holds one setting; peft's rank_pattern / alpha_pattern are not
    written), or when a trained module cannot be named so that peft selects it alone.
    """
    from safetensors.torch import save_file

    from memcomp.compressor import PROJECTION_FILE

    if not isinstance(base_model_name_or_path, str):
        raise ValueError(f"export_peft: base_model_name_or_path must be a str, got {base_model_name_or_path!r}")
    lm, projection = _unwrap(model)
    mods = fqlora_modules(model)
    if not mods:
        raise ValueError("export_peft: the model has no FQLoRA layers: apply_fqlora first -- or, if it was applied, "
                         "every layer is fully fine-tuned (see fqlora_full_ft_layers) and there is no adapter to "
                         "export; save the model with save_pretrained instead")
    settings = {(m.rank, float(m.alpha), float(m.dropout_p), m.use_rslora) for m in mods.values()}
    if len(settings) != 1:
        raise ValueError(f"export_peft: the FQLoRA layers differ in (r, alpha, dropout, use_rslora): "
                         f"{sorted(settings)}; one adapter holds one setting")
    rank, alpha, dropout, rslora = settings.pop()
    to_save = _trained_modules(lm, mods)
    for name in to_save:
        selected = _peft_selected(name, lm)
        if selected != [name]:
            raise ValueError(f"export_peft: peft would wrap {selected} for the modules_to_save entry {name!r}, "
                             "not that module alone")
    names = sorted(mods)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
        "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        # Exactly the wrapped modules (full-FT layers have no adapter): a full-match regex.
        "target_modules": "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$",
        "modules_to_save": to_save or None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    if _embeddings_tied(lm):
        cfg["ensure_weight_tying"] = True

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous().cpu()
        # safetensors refuses tensors that share storage (tied embeddings, views): copy the second one.
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t

    for name in names:
        put(f"{_PEFT_PREFIX}{name}.lora_A.weight", mods[name].lora_A)
        put(f"{_PEFT_PREFIX}{name}.lora_B.weight", mods[name].lora_B)
    for name in to_save:
        for key, value in lm.get_submodule(name).state_dict().items():
            put(f"{_PEFT_PREFIX}{name}.{key}", value)

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    proj_path = os.path.join(directory, PROJECTION_FILE)
    if projection is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in projection.state_dict().items()}, proj_path)
    elif os.path.exists(proj_path):
        os.remove(proj_path)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)


def import_peft(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load a peft LoRA adapter (written by ``export_peft`` or by peft) into an FQLoRA model, in place, so that
    it computes what ``peft.PeftModel.from_pretrained(base, directory)`` computes on its base.

    Loads: the LoRA factors of every FQLoRA layer (the adapter must have exactly these; its r, lora_alpha and
    use_rslora must equal the layers'; lora_dropout stays the model's own, a training setting); every other
    tensor under ``base_model.model.`` into the causal LM's tensor of that name (peft's ``modules_to_save``
    and saved embedding layers; each ``modules_to_save`` entry must select modules outside the FQLoRA layers
    and the file must hold all their tensors, as peft requires); ``memcomp_projection.safetensors``, when the
    folder has one, into a MemoryCompressor's projection (otherwise the projection is left as it is). A
    loaded parameter of a QLoRA layer (say a norm in ``modules_to_save``) becomes trainable, as peft makes
    it, so that ``export_peft`` writes it again.

    Every check runs before anything is copied: on error the model is unchanged. Raises FileNotFoundError
    when ``adapter_config.json`` or ``adapter_model.safetensors`` is missing, and ValueError: for a LoraConfig
    field FQLoRA does not implement (named; see ``PEFT_UNSUPPORTED_FIELDS``), a mismatch of r / alpha /
    use_rslora, an adapter tensor with no counterpart in the model or with another shape (another vocabulary
    size included), FQLoRA layers the adapter has no factors for, different input and output embeddings for a
    model that ties them, and a projection file when ``model`` is not a MemoryCompressor.
    """
    from safetensors.torch import load_file

    from memcomp.compressor import PROJECTION_FILE

    directory = os.fspath(directory)
    for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not os.path.isfile(os.path.join(directory, fname)):
            raise FileNotFoundError(f"{directory} is not a peft adapter: {fname} is missing")
    lm, projection = _unwrap(model)
    mods = fqlora_modules(model)
    if not mods:
        raise ValueError("import_peft: the model has no FQLoRA layers (apply_fqlora first, with the adapter's "
                         "r, lora_alpha and use_rslora)")
    with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
        cfg = _read_lora_config(json.load(f), directory)
    want = (cfg["r"], cfg["alpha"], cfg["use_rslora"])
    for name, m in mods.items():
        if (m.rank, float(m.alpha), m.use_rslora) != want:
            raise ValueError(f"{directory}: adapter r={want[0]}, lora_alpha={want[1]}, use_rslora={want[2]} but "
                             f"FQLoRA layer {name} has r={m.rank}, alpha={m.alpha}, use_rslora={m.use_rslora}; "
                             f"build the model with FQLoRAConfig(rank={want[0]}, alpha={want[1]}, "
                             f"use_rslora={want[2]})")
    state = load_file(os.path.join(directory, ADAPTER_WEIGHTS))

    copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination, value), applied after every check
    lora_loaded: set[tuple[str, str]] = set()
    others: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(_PEFT_PREFIX):
            raise ValueError(f"{directory}: adapter weight {key} is not under {_PEFT_PREFIX!r} (not an adapter "
                             "of a causal LM)")
        stem = key[len(_PEFT_PREFIX):]
        part = next((p for p in ("lora_A", "lora_B") if stem.endswith(f".{p}.weight")), None)
        if part is None:
            others[stem] = value
            continue
        name = stem[: -len(f".{part}.weight")]
        if name not in mods:
            raise ValueError(f"{directory}: adapter weight {key} has no FQLoRA layer {name} in this model")
        target = getattr(mods[name], part)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{directory}: {key} has shape {tuple(value.shape)}, the model's {tuple(target.shape)}")
        copies.append((target, value))
        lora_loaded.add((name, part))
    missing = [n for n in mods if (n, "lora_A") not in lora_loaded or (n, "lora_B") not in lora_loaded]
    if missing:
        raise ValueError(f"{directory}: no adapter weights for {len(missing)} FQLoRA layers, e.g. {missing[0]}")

    lm_state = lm.state_dict(keep_vars=True)
    frozen = _frozen_by_fqlora(lm)
    embed_w = lm.get_input_embeddings().weight
    head_w = getattr(lm.get_output_embeddings(), "weight", None)
    unfreeze: list[nn.Parameter] = []
    for stem, value in others.items():
        owner = next((n for n in mods if stem.startswith(n + ".")), None)
        if owner is not None:
            raise ValueError(f"{directory}: adapter weight {_PEFT_PREFIX}{stem} would overwrite the frozen base of "
                             f"FQLoRA layer {owner}")
        target = lm_state.get(stem)
        if target is None:
            raise ValueError(f"{directory}: adapter weight {_PEFT_PREFIX}{stem} matches no tensor of this model "
                             "(LoRA on embeddings, DoRA and other peft methods are not supported)")
        if tuple(value.shape) != tuple(target.shape):
            hint = ""
            if target is embed_w or target is head_w:
                hint = (f"; the adapter was made for a vocabulary of {value.shape[0]} tokens, this model has "
                        f"{target.shape[0]}: the base must have the adapter's tokenizer (with the MEM tokens "
                        "MemoryCompressor.from_base adds), or be resized to it")
            raise ValueError(f"{directory}: {_PEFT_PREFIX}{stem} has shape {tuple(value.shape)}, the model's "
                             f"{tuple(target.shape)}{hint}")
        if id(target) in frozen:
            if not isinstance(target, nn.Parameter):
                raise ValueError(f"{directory}: adapter weight {_PEFT_PREFIX}{stem} would overwrite a buffer of a "
                                 "QLoRA layer, which FQLoRA keeps frozen")
            unfreeze.append(target)
        copies.append((target, value))

    for entry in cfg["modules_to_save"]:
        selected = _peft_selected(entry, lm)
        if not selected:
            raise ValueError(f"{directory}: modules_to_save entry {entry!r} selects no module of this model")
        for name in selected:
            covered = [n for n in mods if not name or n == name or n.startswith(name + ".")]
            if covered:
                raise ValueError(f"{directory}: modules_to_save entry {entry!r} selects {name or 'the model'}, which "
                                 f"holds FQLoRA layers ({covered[0]}, ...); make that decoder layer a full-FT layer "
                                 "(FQLoRAConfig.full_ft_layers)")
            absent = [k for k in lm.get_submodule(name).state_dict() if (f"{name}.{k}" if name else k) not in others]
            if absent:
                raise ValueError(f"{directory}: modules_to_save entry {entry!r} selects {name}, but the adapter has "
                                 f"no {_PEFT_PREFIX}{name}.{absent[0]}")

    if _embeddings_tied(lm):
        tied = [s for s in others if lm_state[s] is embed_w]
        if len(tied) == 2 and not torch.equal(others[tied[0]], others[tied[1]]):
            raise ValueError(f"{directory}: the adapter has different {tied[0]} and {tied[1]}, but this model ties "
                             "its input and output embeddings (tie_word_embeddings=True)")
        if len(tied) == 1 and not cfg["ensure_weight_tying"] and any(
                tied[0].startswith(n + ".") for e in cfg["modules_to_save"] for n in _peft_selected(e, lm)):
            raise ValueError(f"{directory}: the adapter trains {tied[0]} alone (modules_to_save without "
                             "ensure_weight_tying), which peft applies by untying it from its twin; this model ties "
                             "its input and output embeddings")

    proj_path = os.path.join(directory, PROJECTION_FILE)
    if os.path.isfile(proj_path):
        if projection is None:
            raise ValueError(f"{directory} also holds a compressor projection ({PROJECTION_FILE}); import it into "
                             "the MemoryCompressor, not its causal LM, so that the projection is not dropped")
        proj_state = load_file(proj_path)
        expected = projection.state_dict(keep_vars=True)
        if set(proj_state) != set(expected):
            raise ValueError(f"{proj_path}: tensors {sorted(proj_state)}, the projection has {sorted(expected)}")
        for key, value in proj_state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(f"{proj_path}: {key} has shape {tuple(value.shape)}, the projection's "
                                 f"{tuple(expected[key].shape)}")
            copies.append((expected[key], value))

    with torch.no_grad():
        for target, value in copies:
            target.copy_(value)
    for p in unfreeze:
        p.requires_grad_(True)


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
