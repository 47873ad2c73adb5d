"""Packed attention inside Hugging Face models, through transformers' own registries (no class patching).

``memcomp_packed`` is registered with ``AttentionInterface`` (attention: ``memcomp.fused.packed_attention``
over the segments given by the ``cu_seq_lens_q`` keyword that transformers forwards to every attention
call) and with ``AttentionMaskInterface`` (no mask is built: no T x T tensor for a packed row). A model
instance uses it only inside ``with packed_attention_mode(model):``; everywhere else it keeps its own
implementation (sdpa, flash-attn, ...), e.g. for generation with padding.

Activation checkpointing: Hugging Face's recomputes each layer during ``backward()``, after the ``with`` block
has restored the model's own attention, so the replay would attend across the samples of a packed row (with
reentrant checkpointing: wrong gradients; non-reentrant: torch's CheckpointError, after the forward's work).
``enable_activation_checkpointing`` installs a checkpoint function that replays under the attention
implementation and kernel backend of the forward; ``check_checkpointing`` (run by
``MemoryCompressor.forward_packed``) refuses Hugging Face's own.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from memcomp.fused import current_backend, packed_attention, use_backend

ATTN_IMPLEMENTATION = "memcomp_packed"


def _memcomp_packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """query [1, Hq, T, D], key / value [1, Hkv, T, D] -> ([1, T, Hq, D], None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError("memcomp_packed attention needs cu_seq_lens_q= (the packed segments); "
                         "call the model with cu_seq_lens_q / max_length_q, or outside packed_attention_mode")
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row (batch size 1), got batch size {query.shape[0]}")
    if dropout and module.training:
        raise NotImplementedError(f"memcomp_packed attention has no attention dropout (this model asks for "
                                  f"{dropout}); set config.attention_dropout = 0.0 (Qwen2, Llama and Mistral "
                                  "train without it) or train unpacked")
    _check_supported(kwargs, cu)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))           # [T, H, D]
    out = packed_attention(q, k, v, cu, kwargs.get("max_length_q"), causal=_causal(module, is_causal),
                           softmax_scale=scaling, check_inputs=not cu.is_cuda)
    return out[None], None


# Attention features some transformers models pass to the attention function that the packed kernel does not
# implement; each is refused by name rather than ignored (an ignored one gives silently different losses).
_UNSUPPORTED = {"softcap": "logit soft-capping", "s_aux": "attention sinks", "sinks": "attention sinks"}


def _check_supported(kwargs: dict, cu: torch.Tensor) -> None:
    """Raise ``NotImplementedError`` for an attention feature of the calling model that packed attention would
    otherwise ignore. A sliding window is exact -- and accepted -- when no packed segment is longer than it
    (every query then sees its whole segment, as the window allows); a longer segment is refused."""
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"memcomp_packed attention has no {what} ({name}={kwargs[name]!r} from the "
                                      "model); run this model unpacked")
    window = kwargs.get("sliding_window")
    if window is not None:
        longest = kwargs.get("max_length_q")
        if longest is None:
            longest = int((cu[1:] - cu[:-1]).max())
        if longest > window:
            raise NotImplementedError(
                f"memcomp_packed attention has no sliding window: a packed segment of {longest} tokens is longer "
                f"than the model's sliding_window={window}, so its queries would see keys the model hides; keep "
                f"every sample (decoder side) within {window} tokens, or run this model unpacked")


def _causal(module: torch.nn.Module, is_causal) -> bool:
    """transformers passes ``is_causal`` only from some models; otherwise the module's own flag decides (an
    encoder-style module with ``is_causal = False`` attends both ways)."""
    return bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", True))


def _no_mask(*args, **kwargs):
    return None


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _memcomp_packed_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


@contextlib.contextmanager
def packed_attention_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` (an HF model or its base) on packed rows inside the block; restored afterwards."""
    register()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTN_IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = previous


_REPLAYS_PACKED = "_memcomp_replays_packed"


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _config_of(function, default):
    """The config of the layer being checkpointed, looked up per call so that a deep copy of the model switches
    its own config, not the original's. Hugging Face passes ``partial(forward, layer, ...)`` (5.2x) or
    ``partial(layer.__call__, ...)`` (5.1x)."""
    layer = None
    if isinstance(function, functools.partial):
        layer = function.args[0] if function.args else getattr(function.func, "__self__", None)
    if isinstance(layer, torch.nn.Module):
        for m in layer.modules():
            config = getattr(m, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                return config
    return default


def enable_activation_checkpointing(model: torch.nn.Module, every_n_layers: int = 1) -> int:
    """Checkpoint every ``every_n_layers``-th decoder layer of ``model`` (non-reentrant), replaying each under
    the attention implementation and memcomp backend that its forward ran with. Returns the layers checkpointed."""
    if every_n_layers < 1:
        raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
    layers = _layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Hugging Face GradientCheckpointingLayer to checkpoint")
    def checkpoint_packed(function, *args):
        config = _config_of(function, model.config)
        impl, backend = config._attn_implementation, current_backend()  # as the forward runs

        @contextlib.contextmanager
        def replay() -> Iterator[None]:
            previous = config._attn_implementation
            config._attn_implementation = impl
            try:
                with use_backend(backend):
                    yield
            finally:
                config._attn_implementation = previous

        return checkpoint(function, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), replay()))

    setattr(checkpoint_packed, _REPLAYS_PACKED, True)
    for i, layer in enumerate(layers):
        layer._gradient_checkpointing_func = checkpoint_packed
        layer.gradient_checkpointing = i % every_n_layers == 0
    return sum(layer.gradient_checkpointing for layer in layers)


def disable_activation_checkpointing(model: torch.nn.Module) -> None:
    for layer in _layers(model):
        layer.gradient_checkpointing = False


def check_checkpointing(model: torch.nn.Module) -> None:
    """Raise if a training layer of ``model`` checkpoints with a function that would replay outside packed mode."""
    for layer in _layers(model):
        if layer.training and layer.gradient_checkpointing and not getattr(
                getattr(layer, "_gradient_checkpointing_func", None), _REPLAYS_PACKED, False):
            raise ValueError(
                "the model uses Hugging Face's gradient checkpointing, whose recompute runs during backward() "
                "outside packed attention mode and would attend across the samples of a packed row (wrong "
                "gradients, or torch's CheckpointError); enable it with "
                "MemoryCompressor.enable_activation_checkpointing() instead")
