"""NF4Weight: a frozen 4-bit NormalFloat weight in bitsandbytes' byte layout (see
``memcomp.kernels.nf4_dequantize`` for the format), convertible to and from bitsandbytes' QuantState."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from memcomp.kernels.nf4_dequantize import (
    NESTED_BLOCKSIZE,
    NF4_CODE,
    nf4_dequantize,
    nf4_quantize_reference,
    quantize_absmax_nested,
)


@dataclass
class NF4Weight:
    """``packed`` uint8 [ceil(n / 2)]; ``absmax`` fp32 [n_blocks], or uint8 codes [n_blocks] with the
    nested state (``absmax2`` fp32 [ceil(n_blocks / 256)], ``code2`` fp32 [256], ``offset`` fp32 scalar);
    ``shape`` and ``dtype`` of the original weight."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        if len(self.shape) != 2:
            raise ValueError(f"NF4Weight holds a 2-D [out, in] weight, got shape {tuple(self.shape)}")

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.absmax, self.absmax2, self.code2, self.offset) if t is not None]

    def to(self, device: torch.device | str) -> NF4Weight:
        move = lambda t: None if t is None else t.to(device)
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
                         move(self.absmax2), move(self.code2), move(self.offset))

    def dequantize(self, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense ``shape`` in ``dtype`` (default: the original dtype), written into ``out`` if given (same shape and
        dtype, contiguous or a 2-D row-strided view) and returned. Not differentiable: the weight is frozen.
        Runs the custom op ``memcomp::nf4_dequantize`` (``memcomp::nf4_dequantize_into`` with ``out``)."""
        return nf4_dequantize(self.packed, self.absmax, tuple(self.shape), self.blocksize, dtype or self.dtype,
                              self.absmax2, self.code2, self.offset, out=out)

    # -- bitsandbytes interop ---------------------------------------------------------------------------

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state: Any) -> NF4Weight:
        """From bitsandbytes' ``quantize_4bit`` output (or a ``Params4bit``'s data and quant_state)."""
        if getattr(quant_state, "quant_type", "nf4") != "nf4":
            raise ValueError(f"only NF4 is supported, got quant_type={quant_state.quant_type!r}")
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        nested = bool(getattr(quant_state, "nested", False))
        if nested and quant_state.state2.blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"nested absmax blocksize {quant_state.state2.blocksize} is not {NESTED_BLOCKSIZE}")
        return cls(packed.reshape(-1), quant_state.absmax, torch.Size(quant_state.shape), quant_state.dtype,
                   quant_state.blocksize, quant_state.state2.absmax if nested else None,
                   quant_state.state2.code if nested else None, quant_state.offset if nested else None)

    def to_bnb(self) -> tuple[torch.Tensor, Any]:
        """-> (packed [ceil(n / 2), 1] uint8, ``bitsandbytes.functional.QuantState``)."""
        try:
            from bitsandbytes.functional import QuantState
        except ImportError as exc:
            raise ImportError("NF4Weight.to_bnb needs bitsandbytes: pip install 'memcomp[bnb]'") from exc
        state2 = (QuantState(absmax=self.absmax2, code=self.code2, blocksize=NESTED_BLOCKSIZE,
                             dtype=torch.float32) if self.nested else None)
        qs = QuantState(absmax=self.absmax, shape=self.shape, code=NF4_CODE.to(self.device),
                        blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype, offset=self.offset,
                        state2=state2)
        return self.packed.reshape(-1, 1), qs


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """``weight [N, K]`` (fp32 / fp16 / bf16, any device) -> ``NF4Weight`` in bitsandbytes' layout."""
    if weight.dim() != 2:
        raise ValueError(f"nf4_quantize expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"nf4_quantize expects a floating-point weight, got {weight.dtype}")
    with torch.no_grad():
        packed, absmax = nf4_quantize_reference(weight.detach(), blocksize)
        if not double_quant:
            return NF4Weight(packed, absmax, weight.shape, weight.dtype, blocksize)
        q, absmax2, code2, offset = quantize_absmax_nested(absmax)
    return NF4Weight(packed, q, weight.shape, weight.dtype, blocksize, absmax2, code2, offset)


def nf4_dequantize_weight(q: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``NF4Weight`` -> dense ``[N, K]`` in ``dtype`` (default: the original dtype)."""
    return q.dequantize(dtype)


def nf4_lora_linear(x: torch.Tensor, w: NF4Weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0, training: bool = True) -> torch.Tensor:
    """``x [..., K]`` -> ``[..., N]``: ``x @ dequant(W)^T + scaling * dropout(x) @ A^T @ B^T (+ bias)``.

    ``w`` is frozen; gradients flow to ``x``, ``lora_A [r, K]``, ``lora_B [N, r]`` and ``bias``. Dropout
    (on the LoRA input only, as in peft) is applied when ``training`` and ``dropout_p > 0``.
    """
    from memcomp.kernels.nf4_lora_linear import nf4_lora_linear_raw

    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"nf4_lora_linear: x has {x.shape[-1]} features, the weight expects K={K}")
    if not x.is_floating_point():
        raise TypeError(f"nf4_lora_linear: x must be floating point, got {x.dtype}")
    if lora_A.dim() != 2 or lora_A.shape[0] < 1 or lora_A.shape[1] != K:
        raise ValueError(f"nf4_lora_linear: lora_A must be [r >= 1, K={K}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"nf4_lora_linear: lora_B must be [N={N}, r={r}], got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"nf4_lora_linear: bias must be [N={N}], got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"nf4_lora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    for name, t in (("weight", w.packed), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"nf4_lora_linear: {name} is on {t.device} but x is on {x.device}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    xd2d = F.dropout(x2d, dropout_p, training=True) if (training and dropout_p > 0) else None
    y = nf4_lora_linear_raw(x2d, xd2d, w.packed, w.absmax, w.absmax2, w.code2, w.offset, N, K, w.blocksize,
                            lora_A, lora_B, scaling, bias)
    return y.reshape(*lead, N)
