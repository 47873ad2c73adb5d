"""MemoryCompressor: one causal LM as encoder and decoder (seed 002, section 3.1).

Encoder: the text is cut into chunks of C tokens; each chunk runs through the LM alone (positions from 0,
no attention across chunks, no LM head); its final-layer hidden states go through the model's final
RMSNorm, are averaged over the chunk's real tokens and projected by a d x d linear layer -- all three in
one fused op (``memcomp.fused.segment_mean_proj``) -- giving one memory embedding per chunk.

Decoder: the memory embeddings, wrapped by <MEM_START>/<MEM_END>, then the instruction (then, in
training, the target), fed to the same LM as ``inputs_embeds``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from memcomp.config import CompressorConfig
from memcomp.fused import segment_mean_proj
from memcomp.memory import Memory, MemoryMismatchError
from memcomp.packing import PackedBatch
from memcomp.profiling import nvtx_first_forward, nvtx_range
from memcomp.projection import init_projection

CONFIG_FILE = "memcomp_config.json"
PROJECTION_FILE = "memcomp_projection.safetensors"
FORMAT = "memcomp-compressor"

TokenIds = Union[torch.Tensor, Sequence[int]]
TextOrIds = Union[str, TokenIds]


class CompressorOutput(NamedTuple):
    """``loss``: mean over target tokens; ``token_losses``: one per target token, in batch order.
    (A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 hooks the tensors of a module's output to re-gather
    parameters for the backward, and it looks inside tuples, lists and dicts only.)"""

    loss: torch.Tensor
    token_losses: torch.Tensor
    num_target_tokens: int


@dataclass
class DecoderInputs:
    """A decoder batch: ``inputs_embeds [B, L, d]``, ``attention_mask [B, L]``, ``position_ids [B, L]``,
    ``labels [B, L]`` (-100 outside targets; None without targets), ``memory_positions`` (one index
    tensor [n_b] per row: where that row's memory embeddings sit), ``padded`` (any padding at all, known on
    the host so the hot path needs no device sync to drop an all-ones mask)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: Optional[torch.Tensor]
    memory_positions: list[torch.Tensor]
    padded: bool = True

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        return {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


# Generation options that decide the same thing as one of memcomp's defaults in ``generate``.
_LENGTH_OPTIONS = ("max_new_tokens", "max_length")
_SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def generation_kwargs(kwargs: dict[str, Any], *, pad_token_id: Optional[int],
                      max_new_tokens: int = 64) -> dict[str, Any]:
    """memcomp's generation defaults (greedy, ``max_new_tokens``, ``pad_token_id``) merged under the caller's
    options: a default is added only when the caller set nothing that decides the same thing, by keyword or
    through the non-default fields of a ``generation_config`` (a ``transformers.GenerationConfig``). So
    ``max_length=5`` is not overridden by the 64-token default, and a config's ``do_sample=True`` samples.

    Raises ``ValueError`` when sampling parameters (temperature, top_p, ...) are set but ``do_sample`` is not:
    memcomp decodes greedily by default, and transformers would ignore them with only a warning."""
    out = dict(kwargs)
    config = out.get("generation_config")
    decided = set(out)
    if config is not None:
        decided |= {k for k in config.to_diff_dict() if k != "transformers_version"}
    if not decided & set(_LENGTH_OPTIONS):
        out["max_new_tokens"] = max_new_tokens
    if "do_sample" not in decided:
        sampling = sorted(decided & set(_SAMPLING_OPTIONS))
        if sampling:
            raise ValueError(f"generate: {', '.join(sampling)} set without do_sample; memcomp decodes greedily "
                             "by default, so pass do_sample=True to sample (or drop them)")
        out["do_sample"] = False
    if "pad_token_id" not in decided:
        out["pad_token_id"] = pad_token_id
    return out


_HASH_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 (the golden-ratio constant) as a signed int64: odd
_HASH_CHUNK_MIX = 0x27D4EB2F165667C5  # odd
_HASH_CHUNK = 1 << 20  # elements per step: 8 MB of int64 products, cache-sized on a CPU
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_hash_coefficients: dict[torch.device, torch.Tensor] = {}


def _wrap_int64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _content_sum(t: torch.Tensor) -> torch.Tensor:
    """int64 scalar on ``t``'s device (``fingerprint``): the bits of chunk j of ``t`` (2^20 elements) summed as
    S_j = sum_k bits_jk (2 k + 1) MIX, then sum_j S_j (2 j + 1) MIX', all wrapping mod 2^64. Every coefficient is
    an odd number, so changing the bits of any one element always changes the result; other changes collide
    with probability ~2^-64. Integer sums are exact in any order: the same bits give the same value on any
    device."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.view(_INT_OF_WIDTH[flat.element_size()])
    n = min(bits.numel(), _HASH_CHUNK)
    base = _hash_coefficients.get(t.device)
    if base is None or base.numel() < n:
        base = (torch.arange(n, device=t.device, dtype=torch.int64) * 2 + 1) * _HASH_MIX  # wraps, as intended
        _hash_coefficients[t.device] = base
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for j, s in enumerate(range(0, bits.numel(), _HASH_CHUNK)):
        x = bits[s:s + _HASH_CHUNK]
        total += (x * base[: x.numel()]).sum() * _wrap_int64((2 * j + 1) * _HASH_CHUNK_MIX)  # int64 products
    return total


def _check_room(kwargs: dict[str, Any], prompt_positions: int) -> None:
    """transformers counts the prompt embeddings in ``max_length`` when ``generate`` gets ``inputs_embeds`` alone
    (total = prompt positions + new tokens); say so plainly when no room is left, instead of its
    "max_length is set to -51"."""
    config = kwargs.get("generation_config")
    max_length = kwargs.get("max_length", getattr(config, "max_length", None) if config is not None else None)
    max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None) if config is not None else None)
    if max_new is None and max_length is not None and max_length <= prompt_positions:
        raise ValueError(f"generate: max_length={max_length} counts the whole decoder input, and the prompt "
                         f"already takes {prompt_positions} positions (memory block with its MEM tokens, "
                         "prefix and instruction); raise max_length or pass max_new_tokens")


def _eps_of(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise ValueError(f"cannot find the epsilon of the final norm {type(norm).__name__}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) or (
        isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point() and v.dtype != torch.bool)


def _is_one_text(x: Any) -> bool:
    """A str, a 1-D tensor, or a list / tuple of ints (``[]`` included) is one text; anything else may be many."""
    if isinstance(x, str) or (isinstance(x, torch.Tensor) and x.dim() == 1):
        return True
    return isinstance(x, (list, tuple)) and all(_is_int(v) for v in x)


class MemoryCompressor(nn.Module):
    """Wraps a Hugging Face causal LM (Qwen2 / Llama / Mistral families) by composition."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: CompressorConfig,
                 projection: nn.Linear) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.projection = projection
        window = getattr(model.config, "max_position_embeddings", None)
        if window is not None and config.chunk_size > window:
            raise ValueError(f"chunk_size={config.chunk_size} is longer than the model's context window "
                             f"(max_position_embeddings={window}): each chunk is encoded in one pass")
        self.mem_start_id = tokenizer.convert_tokens_to_ids(config.mem_start_token)
        self.mem_end_id = tokenizer.convert_tokens_to_ids(config.mem_end_token)
        self._fp_key: Optional[tuple] = None
        self._fp: str = ""

    # ------------------------------------------------------------------------------------------------
    # Construction, persistence
    # ------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_architecture(model: nn.Module) -> None:
        base = getattr(model, "base_model", None)
        missing = [a for a in ("embed_tokens", "layers", "norm") if not hasattr(base, a)]
        if base is None or base is model or missing or model.get_output_embeddings() is None:
            raise ValueError(
                f"MemoryCompressor needs a Hugging Face causal LM of the Qwen2 / Llama / Mistral families "
                f"(a base model with embed_tokens, layers and a final norm, plus an LM head); got "
                f"{type(model).__name__}" + (f" (base model lacks {', '.join(missing)})" if missing else ""))
        _eps_of(base.norm)

    @classmethod
    def from_base(cls, model: nn.Module, tokenizer: Any,
                  config: Optional[CompressorConfig] = None) -> MemoryCompressor:
        """Wrap ``model``: add the MEM tokens to ``tokenizer``, resize embeddings, create the projection."""
        config = config or CompressorConfig()
        cls._check_architecture(model)
        tokenizer.add_tokens([config.mem_start_token, config.mem_end_token], special_tokens=True)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            from transformers.utils import logging as hf_logging

            # Its notice (new rows drawn from the old rows' mean and covariance, "use mean_resizing=False" to
            # turn off) describes the init memcomp wants for the MEM rows, on every run: not printed.
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                model.resize_token_embeddings(len(tokenizer))
            finally:
                hf_logging.set_verbosity(verbosity)
        d = model.config.hidden_size
        ref = model.get_input_embeddings().weight
        projection = nn.Linear(d, d, bias=config.projection_bias, device=ref.device, dtype=ref.dtype)
        init_projection(projection, model, config.projection_init)  # memcomp.projection: why scaled_normal
        return cls(model, tokenizer, config, projection)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Model and tokenizer (HF format), projection (safetensors), config (JSON, written last)."""
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        marker = os.path.join(directory, CONFIG_FILE)
        if os.path.exists(marker):
            os.remove(marker)  # an interrupted save never looks complete
        from memcomp.fqlora import merged_state_dict  # FQLoRA layers as dense linears: else loaded at random

        self.model.save_pretrained(directory, state_dict=merged_state_dict(self.model))
        self.tokenizer.save_pretrained(directory)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.projection.state_dict().items()},
                  os.path.join(directory, PROJECTION_FILE))
        tmp = marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, "format_version": 1, "config": self.config.to_dict()}, f, indent=2)
        os.replace(tmp, marker)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> MemoryCompressor:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = os.fspath(directory)
        marker = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(marker):
            raise FileNotFoundError(f"{directory} is not a saved MemoryCompressor ({CONFIG_FILE} missing: "
                                    "the save did not finish, or this is a plain model directory -- wrap "
                                    "plain models with MemoryCompressor.from_base)")
        with open(marker) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{marker} is not a memcomp compressor config (format={meta.get('format')!r})")
        if meta.get("format_version") != 1:
            raise ValueError(f"{marker}: format_version {meta.get('format_version')!r}, this memcomp reads version 1")
        config = CompressorConfig.from_dict(meta["config"])
        tokenizer = AutoTokenizer.from_pretrained(directory)
        vocab = tokenizer.get_vocab()
        missing = [t for t in (config.mem_start_token, config.mem_end_token) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer in {directory} lacks the compressor's special tokens {missing}")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        cls._check_architecture(model)
        state = load_file(os.path.join(directory, PROJECTION_FILE))
        if ("bias" in state) != config.projection_bias:
            raise ValueError(f"{directory}: projection_bias={config.projection_bias} in {CONFIG_FILE}, but "
                             f"{PROJECTION_FILE} {'has' if 'bias' in state else 'lacks'} a bias")
        d = model.config.hidden_size
        ref = model.get_input_embeddings().weight
        projection = nn.Linear(d, d, bias="bias" in state, device=ref.device, dtype=ref.dtype)
        projection.load_state_dict(state)
        comp = cls(model, tokenizer, config, projection)
        return comp.to(device) if device is not None else comp

    # ------------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------------

    @property
    def base(self) -> nn.Module:
        return self.model.base_model

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # Model-config fields that change what the encoder computes (the weights are hashed separately).
    _FINGERPRINT_CONFIG = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
                           "num_key_value_heads", "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps",
                           "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias",
                           "use_sliding_window", "sliding_window", "tie_word_embeddings")

    def encoder_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor the encoder reads: the base model's parameters and buffers (token embeddings, all
        decoder layers -- FQLoRA's NF4 buffers and LoRA adapters included --, the final norm, rotary tables)
        and the projection's. The LM head is not read by the encoder (unless tied to the embeddings, in which
        case it is the same tensor)."""
        named = [(f"base.{n}", t) for n, t in self.base.named_parameters()]
        named += [(f"base.{n}", t) for n, t in self.base.named_buffers() if t is not None]
        named += [(f"projection.{n}", t) for n, t in self.projection.named_parameters()]
        return named

    def fingerprint(self) -> str:
        """16 hex digits identifying what determines the memory embeddings: the chunk size, the architecture
        fields of the model config (``_FINGERPRINT_CONFIG``), and the exact bits, dtype and shape of every tensor
        the encoder reads (``encoder_tensors``). Decoder-side choices (the wrapper layout, the LM head) are not
        covered. Any change to any element changes it: a sparse update of a few embedding rows included.

        The content hash runs on the tensors' own device, with no host copy of the weights: per tensor, a sum of
        the elements' bits times odd, position-dependent coefficients in wrapping int64 arithmetic
        (``_content_sum``: a change to any one element always changes it); one host sync per device, then
        SHA-256 over the per-tensor sums, names, shapes and dtypes. It is recomputed only after a tensor changes
        (an in-place update, which bumps its version counter, a new storage, dtype or shape), so repeated
        ``encode`` calls pay nothing. Cost, measured on one CPU thread: ~0.6 s for 135M parameters (one int64
        multiply-add per element); on a GPU it streams each weight once (not yet measured).

        Raises ``RuntimeError`` for DeepSpeed ZeRO-3-partitioned parameters (gather them first)."""
        named = self.encoder_tensors()
        try:
            key = tuple((id(t), t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for _, t in named)
        except RuntimeError:  # inference tensors keep no version counter: always recompute
            key = None
        if key is None or key != self._fp_key:
            partitioned = [n for n, t in named if getattr(t, "ds_numel", None) not in (None, t.numel())]
            if partitioned:
                raise RuntimeError(f"fingerprint: {partitioned[0]} is partitioned by DeepSpeed ZeRO-3; gather the "
                                   "parameters (deepspeed.zero.GatheredParameters) before encoding")
            h = hashlib.sha256()
            h.update(json.dumps({"chunk_size": self.config.chunk_size}).encode())
            arch = {k: getattr(self.model.config, k, None) for k in self._FINGERPRINT_CONFIG}
            h.update(json.dumps(arch, sort_keys=True, default=str).encode())
            with torch.no_grad():
                by_device: dict[torch.device, list[int]] = {}
                for i, (_, t) in enumerate(named):
                    by_device.setdefault(t.device, []).append(i)
                sums = [0] * len(named)
                for idx in by_device.values():  # one host sync per device
                    for i, v in zip(idx, torch.stack([_content_sum(named[i][1]) for i in idx]).tolist()):
                        sums[i] = v
            for (name, t), v in zip(named, sums):
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{v};".encode())
            self._fp_key, self._fp = key, h.hexdigest()[:16]
        return self._fp

    def check_memory(self, memory: Memory) -> None:
        if memory.hidden_size != self.hidden_size:
            raise MemoryMismatchError(f"memory has hidden size {memory.hidden_size}, this compressor "
                                      f"{self.hidden_size}: it was made by a different model")
        if memory.chunk_size != self.config.chunk_size:
            raise MemoryMismatchError(f"memory was made with chunk_size {memory.chunk_size}, this "
                                      f"compressor uses {self.config.chunk_size}")
        if memory.fingerprint != self.fingerprint():
            raise MemoryMismatchError(f"memory fingerprint {memory.fingerprint} does not match this "
                                      f"compressor ({self.fingerprint()}): it was made by another compressor "
                                      "or before these weights changed; re-encode the text")

    # ------------------------------------------------------------------------------------------------
    # Encoder
    # ------------------------------------------------------------------------------------------------

    def tokenize(self, text: TextOrIds) -> torch.Tensor:
        """One text -> its token ids, ``[T]`` int64. The one rule for token ids across the API (``encode``,
        ``generate``, ``build_decoder_inputs``, ``forward``): a text is a ``str`` (tokenized here, no special
        tokens), a list of ints, or a 1-D integer tensor. Raises ``TypeError`` for float / bool ids or a list
        mixing other things, ``ValueError`` for a tensor that is not 1-D (a tokenizer's ``[1, T]`` output:
        pass ``input_ids[0]``; a padded ``[B, T]`` batch would read its padding as text) and for ids outside
        the model's vocabulary ``[0, V)``."""
        if isinstance(text, str):
            return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if isinstance(text, torch.Tensor):
            if text.is_floating_point() or text.is_complex() or text.dtype == torch.bool:
                raise TypeError(f"token ids must be integers, got a {text.dtype} tensor")
            if text.dim() != 1:
                raise ValueError(f"token ids of one text must be 1-D [T], got shape {tuple(text.shape)}; for a "
                                 "tokenizer's [1, T] output pass input_ids[0], for several texts a list of 1-D "
                                 "tensors (a padded [B, T] batch would read its padding as text)")
            ids = text.to(torch.long)
        elif isinstance(text, (list, tuple)):
            bad = next((v for v in text if not _is_int(v)), None)
            if bad is not None:
                raise TypeError(f"token ids must be ints, got {type(bad).__name__} {bad!r} in the list (a text is "
                                "a str, a list of ints or a 1-D integer tensor)")
            ids = torch.tensor([int(v) for v in text], dtype=torch.long)
        else:
            raise TypeError(f"a text is a str, a list of ints or a 1-D integer tensor, got {type(text).__name__}")
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}) (the model's vocabulary), got "
                             f"{int(ids.min())} .. {int(ids.max())}")
        return ids

    def _as_texts(self, inputs: Any) -> tuple[list[Any], bool]:
        """(texts, single): one text (``tokenize``'s rule) or a list / tuple of texts."""
        if _is_one_text(inputs):
            return [inputs], True
        if isinstance(inputs, (list, tuple)):
            return list(inputs), False
        if isinstance(inputs, torch.Tensor):
            self.tokenize(inputs)  # raises the one-rule error (dtype, or a [B, T] tensor)
        raise TypeError(f"expected a text (str, list of ints, 1-D integer tensor) or a list of texts, got "
                        f"{type(inputs).__name__}")

    @contextlib.contextmanager
    def _without_final_norm(self) -> Iterator[nn.Module]:
        """Swap the base model's final norm for Identity on this instance while the encoder runs: the
        fused pooling op applies that norm itself (one read of the hidden states instead of two)."""
        base = self.base
        norm = base.norm
        base.norm = nn.Identity()
        try:
            yield norm
        finally:
            base.norm = norm

    def encode_chunks(self, ids: Sequence[torch.Tensor], *, chunks_per_batch: Optional[int] = None,
                      progress: Optional[bool] = None) -> list[torch.Tensor]:
        """Differentiable core of ``encode``: token-id tensors -> one ``[n_chunks_i, d]`` tensor each."""
        C = self.config.chunk_size
        cpb = chunks_per_batch or self.config.chunks_per_batch
        device = self.device
        pad_id = self.tokenizer.pad_token_id
        # Every chunk of every text: (text index, ids); the last chunk of a text may be short.
        chunks: list[torch.Tensor] = []
        owner: list[int] = []
        for i, t in enumerate(ids):
            for s in range(0, t.numel(), C):
                chunks.append(t[s:s + C])
                owner.append(i)
        n_batches = math.ceil(len(chunks) / cpb)
        show = progress if progress is not None else self.config.progress
        show = n_batches > 32 if show is None else show
        pieces: list[torch.Tensor] = []
        batches = range(0, len(chunks), cpb)
        if show:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=n_batches, desc="memcomp encode", unit="batch")
        with nvtx_range("encode"), self._without_final_norm() as norm:
            for b0 in batches:
                group = chunks[b0:b0 + cpb]
                lengths = torch.tensor([c.numel() for c in group])
                width = int(lengths.max())
                batch = torch.full((len(group), width), pad_id, dtype=torch.long)
                for j, c in enumerate(group):
                    batch[j, : c.numel()] = c
                # Right padding under causal attention cannot reach the real tokens: no mask needed.
                hidden = self.base(input_ids=batch.to(device), use_cache=False).last_hidden_state
                if bool((lengths == width).all()):
                    flat = hidden.reshape(-1, hidden.shape[-1])
                else:
                    keep = torch.arange(width) < lengths[:, None]
                    flat = hidden[keep.to(device)]
                cu = torch.zeros(len(group) + 1, dtype=torch.int32)
                cu[1:] = torch.cumsum(lengths, 0)
                with nvtx_range("pool"):
                    pieces.append(segment_mean_proj(
                        flat, cu.to(device, non_blocking=True), self.projection.weight, self.projection.bias,
                        norm.weight, _eps_of(norm), check_inputs=False))
        d = self.hidden_size
        emb = torch.cat(pieces) if pieces else torch.empty((0, d), device=device, dtype=self.dtype)
        counts = [math.ceil(t.numel() / C) for t in ids]
        return list(torch.split(emb, counts))

    @torch.no_grad()
    def encode(self, inputs: Union[TextOrIds, Sequence[str]], *, chunks_per_batch: Optional[int] = None,
               progress: Optional[bool] = None) -> Union[Memory, list[Memory]]:
        """One text (a str, a list of ints or a 1-D integer tensor: ``tokenize``'s rule; ``[]`` is one empty text)
        -> ``Memory``; a list of texts -> a list of ``Memory``."""
        texts, single = self._as_texts(inputs)
        ids = [self.tokenize(t) for t in texts]
        embs = self.encode_chunks(ids, chunks_per_batch=chunks_per_batch, progress=progress)
        fp = self.fingerprint()
        mems = [Memory(e, t.numel(), self.config.chunk_size, fp) for e, t in zip(embs, ids)]
        return mems[0] if single else mems

    # ------------------------------------------------------------------------------------------------
    # Decoder
    # ------------------------------------------------------------------------------------------------

    def memory_layout(self, n_chunks: int) -> tuple[list[int], list[int]]:
        """Token ids of the memory block (placeholders = pad id) and the memory slots within it."""
        S, E, P = self.mem_start_id, self.mem_end_id, self.tokenizer.pad_token_id
        if n_chunks == 0:
            return [], []
        if self.config.wrapper == "per_embedding":
            return [S, P, E] * n_chunks, [3 * i + 1 for i in range(n_chunks)]
        return [S] + [P] * n_chunks + [E], list(range(1, n_chunks + 1))

    def _memory_tensor(self, m: Union[Memory, torch.Tensor]) -> torch.Tensor:
        if isinstance(m, Memory):
            self.check_memory(m)
            return m.embeddings
        if m.dim() != 2 or m.shape[1] != self.hidden_size:
            raise MemoryMismatchError(f"memory embeddings must be [n, {self.hidden_size}], got {tuple(m.shape)}")
        return m

    def build_decoder_inputs(self, memories: Sequence[Union[Memory, torch.Tensor]],
                             instructions: Sequence[TextOrIds],
                             targets: Optional[Sequence[TextOrIds]] = None, *,
                             padding_side: str = "left", append_eos: bool = True,
                             prefixes: Optional[Sequence[TextOrIds]] = None) -> DecoderInputs:
        """One row per sample: prefix (e.g. ChatML system and user headers; none by default), memory block,
        instruction, then (if given) the target (+ EOS).

        Rows are padded on ``padding_side`` (left for generation, right for training); position ids
        count real tokens from 0 in each row; labels are -100 except on target tokens.
        """
        if prefixes is not None and len(prefixes) != len(memories):
            raise ValueError(f"build_decoder_inputs: {len(memories)} memories but {len(prefixes)} prefixes")
        if len(memories) != len(instructions) or (targets is not None and len(targets) != len(memories)):
            raise ValueError(f"build_decoder_inputs: {len(memories)} memories, {len(instructions)} "
                             f"instructions" + ("" if targets is None else f", {len(targets)} targets"))
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not memories:
            raise ValueError("build_decoder_inputs needs at least one sample")
        device = self.device
        rows, slots, label_rows, mems = [], [], [], []
        eos = self.tokenizer.eos_token_id
        for i, m in enumerate(memories):
            mem = self._memory_tensor(m)
            block, slot = self.memory_layout(mem.shape[0])
            prefix = self.tokenize(prefixes[i]).tolist() if prefixes is not None else []
            slot = [len(prefix) + k for k in slot]
            inst = self.tokenize(instructions[i]).tolist()
            row = prefix + block + inst
            labels = [-100] * len(row)
            if targets is not None:
                tgt = self.tokenize(targets[i]).tolist() + ([eos] if append_eos and eos is not None else [])
                row += tgt
                labels += tgt
            rows.append(row)
            slots.append(slot)
            label_rows.append(labels)
            mems.append(mem)
        L = max(len(r) for r in rows)
        B = len(rows)
        ids = torch.full((B, L), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        pos = torch.zeros((B, L), dtype=torch.long)
        memory_positions = []
        for b, row in enumerate(rows):
            off = L - len(row) if padding_side == "left" else 0
            ids[b, off:off + len(row)] = torch.tensor(row)
            attn[b, off:off + len(row)] = 1
            labels[b, off:off + len(row)] = torch.tensor(label_rows[b])
            pos[b, off:off + len(row)] = torch.arange(len(row))
            memory_positions.append(torch.tensor(slots[b], dtype=torch.long) + off)
        padded = any(len(r) != L for r in rows)
        ids, attn, labels, pos = (t.to(device) for t in (ids, attn, labels, pos))
        embeds = self.model.get_input_embeddings()(ids)
        batch_idx = torch.cat([torch.full((len(s),), b, dtype=torch.long) for b, s in enumerate(slots)])
        slot_idx = torch.cat(memory_positions)
        if slot_idx.numel():
            values = torch.cat(mems).to(device=device, dtype=embeds.dtype)
            embeds = embeds.index_put((batch_idx.to(device), slot_idx.to(device)), values)
        return DecoderInputs(embeds, attn, pos, labels if targets is not None else None, memory_positions, padded)

    def forward(self, instructions: Union[Sequence[TextOrIds], PackedBatch],
                targets: Optional[Sequence[TextOrIds]] = None, *,
                contexts: Optional[Sequence[TextOrIds]] = None,
                memories: Optional[Sequence[Union[Memory, torch.Tensor]]] = None,
                append_eos: bool = True) -> CompressorOutput:
        """LM loss on the target tokens only, given either raw ``contexts`` (encoded here, with gradients
        through the encoder) or precomputed ``memories``. The LM head runs on target rows only. Given a
        ``PackedBatch`` instead, this is ``forward_packed`` (the entry point DeepSpeed's engine calls)."""
        if isinstance(instructions, PackedBatch):
            return self.forward_packed(instructions)
        if targets is None:
            raise ValueError("forward needs targets (or a PackedBatch)")
        if (contexts is None) == (memories is None):
            raise ValueError("forward needs exactly one of contexts= or memories=")
        if contexts is not None:
            memories = self.encode_chunks([self.tokenize(c) for c in contexts])
        batch = self.build_decoder_inputs(memories, instructions, targets, padding_side="right",
                                          append_eos=append_eos)
        with nvtx_range("decoder"):
            mask = batch.attention_mask if batch.padded else None
            hidden = self.base(inputs_embeds=batch.inputs_embeds, attention_mask=mask,
                               position_ids=batch.position_ids, use_cache=False).last_hidden_state
        with nvtx_range("loss"):
            shifted = batch.labels[:, 1:]
            sel = shifted != -100
            logits = self.model.get_output_embeddings()(hidden[:, :-1][sel])
            token_losses = F.cross_entropy(logits.float(), shifted[sel], reduction="none")
        n = int(sel.sum())
        if n == 0:
            raise ValueError("forward: no target tokens in the batch")
        return CompressorOutput(token_losses.mean(), token_losses, n)

    def enable_activation_checkpointing(self, every_n_layers: int = 1) -> int:
        """Recompute every ``every_n_layers``-th decoder layer in backward instead of keeping its activations
        (non-reentrant ``torch.utils.checkpoint``); safe with packed rows, unlike Hugging Face's own, whose replay
        would run outside packed attention mode. Returns the number of layers checkpointed."""
        from memcomp.attention import enable_activation_checkpointing

        return enable_activation_checkpointing(self.model, every_n_layers)

    def disable_activation_checkpointing(self) -> None:
        from memcomp.attention import disable_activation_checkpointing

        disable_activation_checkpointing(self.model)

    def forward_packed(self, batch: PackedBatch) -> CompressorOutput:
        """Training forward over one packed row (``memcomp.packing``): encoder over all chunks (packed
        attention, one segment per chunk) -> fused norm + mean + projection -> embeddings written at the
        placeholder slots -> decoder over all samples (packed attention, one segment per sample) -> loss on
        the target rows only (fused linear cross-entropy, no [T, vocab] logits). ``token_losses`` follow
        ``batch.target_rows``."""
        from memcomp.attention import check_checkpointing, packed_attention_mode
        from memcomp.fused import linear_cross_entropy

        if self.training:
            check_checkpointing(self.model)
        batch = batch.to(self.device)
        embed = self.model.get_input_embeddings()
        # Under distributed training (ZeRO-3) every rank must run the same module passes: a row without
        # chunks (plain LM only) encodes a one-token dummy chunk that enters the decoder inputs at weight 0.
        dummy = batch.n_chunks == 0 and torch.distributed.is_available() and torch.distributed.is_initialized()
        memory = None
        with packed_attention_mode(self.model):
            embeds = embed(batch.dec_input_ids)
            if batch.n_chunks or dummy:
                ids, pos, cu, width = ((batch.enc_input_ids, batch.enc_position_ids, batch.enc_cu_seqlens,
                                        batch.enc_max_seqlen) if not dummy else
                                       (batch.dec_input_ids[:1], torch.zeros_like(batch.dec_input_ids[:1]),
                                        torch.tensor([0, 1], dtype=torch.int32, device=self.device), 1))
                with nvtx_range("encode"), self._without_final_norm() as norm:
                    hidden = self.base(input_ids=ids[None], position_ids=pos[None], cu_seq_lens_q=cu,
                                       cu_seq_lens_k=cu, max_length_q=width, max_length_k=width,
                                       use_cache=False).last_hidden_state[0]
                    with nvtx_range("pool"):
                        memory = segment_mean_proj(hidden, cu, self.projection.weight, self.projection.bias,
                                                   norm.weight, _eps_of(norm), check_inputs=False)
                if not dummy:
                    embeds = embeds.index_put((batch.memory_slots,), memory.to(embeds.dtype))
                else:  # through the decoder inputs, as real memory goes: the same backward order on all ranks
                    embeds = embeds + 0.0 * memory.to(embeds.dtype).sum()
            cu = batch.dec_cu_seqlens
            with nvtx_range("decoder"):
                hidden = self.base(inputs_embeds=embeds[None], position_ids=batch.dec_position_ids[None],
                                   cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.dec_max_seqlen,
                                   max_length_k=batch.dec_max_seqlen, use_cache=False).last_hidden_state[0]
        with nvtx_range("loss"):
            head = self.model.get_output_embeddings()
            # The collator built target_ids from token ids already checked against the vocabulary: no
            # per-step host sync to check them again.
            losses = linear_cross_entropy(hidden[batch.target_rows], head.weight, batch.target_ids,
                                          getattr(head, "bias", None), check_inputs=False)
        n = batch.target_rows.numel()
        if n == 0:
            raise ValueError("forward_packed: the batch has no target tokens")
        return CompressorOutput(losses.mean(), losses, n)

    @torch.no_grad()
    def generate(self, memories: Union[Memory, Sequence[Union[Memory, torch.Tensor]]],
                 prompts: Union[TextOrIds, Sequence[TextOrIds]],
                 prefixes: Optional[Sequence[TextOrIds]] = None, **generate_kwargs: Any) -> list[str]:
        """Decode from [prefix +] memory + prompt with HF ``generate`` on ``inputs_embeds``; the new tokens only,
        decoded, one string per memory.

        ``generate_kwargs`` (and a ``generation_config=``) go to ``transformers.GenerationMixin.generate``.
        memcomp's defaults -- greedy, 64 new tokens, the tokenizer's pad id -- fill in only what the caller
        decided nothing about (see ``generation_kwargs``): a ``max_length`` or a ``GenerationConfig`` with a
        length is obeyed. As in transformers for ``inputs_embeds``, ``max_length`` bounds prompt positions
        (memory block, prefix, instruction) plus new tokens; ``max_new_tokens`` bounds new tokens alone.
        Raises ``ValueError`` for sampling parameters without ``do_sample``, or a ``max_length`` that leaves no
        room after the prompt."""
        if isinstance(memories, (Memory, torch.Tensor)):
            memories = [memories]
        if _is_one_text(prompts):  # one prompt (str or token ids) for every memory
            prompts = [prompts] * len(memories)
        batch = self.build_decoder_inputs(memories, prompts, padding_side="left", prefixes=prefixes)
        generate_kwargs = generation_kwargs(generate_kwargs, pad_token_id=self.tokenizer.pad_token_id)
        _check_room(generate_kwargs, batch.inputs_embeds.shape[1])
        with nvtx_range("generate"), nvtx_first_forward(self.model, "prefill"):
            out = self.model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                      **generate_kwargs)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)
