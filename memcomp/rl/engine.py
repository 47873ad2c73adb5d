"""Rollout engines: the interface the DAPO rollouts, the LycheeMemory reasoner and a vLLM engine share, and the
first engine, Hugging Face ``generate`` on ``inputs_embeds``.

A request is a memory (a ``Memory``, its embeddings ``[n, d]``, or None for a plain-text prompt: MemAgent's raw
chunks, a full-context prompt, LycheeMemory's final answer), a prompt (text or token ids) and an optional prefix;
the decoder input is ``prefix + memory block + prompt``, laid out by ``MemoryCompressor.build_decoder_inputs``
exactly as in training (no memory block at all when the memory is None). ``generate(requests, options)`` returns ``n``
results per request (``SamplingOptions.n``: DAPO's G responses per prompt), each with its token ids, text,
finish reason and, when asked, the per-token log-probabilities the RL loss needs as ``old_logp``.

Which log-probabilities: ``log softmax(logits)`` of the model's raw logits at temperature 1, no top-p -- the
untempered policy pi_theta, the same distribution the trainer's forward computes (``-linear_cross_entropy`` of
the hidden states). DAPO's ratio pi_theta / pi_old must be 1 before the first update; log-probabilities of the
tempered or truncated sampling distribution would bias every ratio by a factor that depends on the token, and
the clipping would act on that bias instead of on the policy change. With DAPO's settings (temperature 1.0,
top_p 1.0) the sampling distribution IS the policy; with other settings the samples come from the tempered /
truncated distribution while the log-probabilities stay the policy's (the importance weights then ignore the
difference between the two, as they do in verl when its rollout temperature is 1 and the actor's is not).
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch

from memcomp.memory import Memory, MemoryMismatchError

if TYPE_CHECKING:
    from memcomp.compressor import MemoryCompressor

TextOrIds = Union[str, Sequence[int], torch.Tensor]
FinishReason = Literal["stop", "length"]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample. ``n``: responses per request (>= 1); ``temperature``: 0 is greedy (then ``n`` must be 1 and
    ``top_p`` 1.0: n identical copies, or a top-p that has no effect, are refused), else > 0; ``top_p``: nucleus
    mass in (0, 1]; ``max_new_tokens``: the response limit (>= 1; DAPO's 600); ``stop_token_ids``: tokens that
    end a response besides the tokenizer's EOS, which always does (as in vLLM); ``seed``: with a seed the call's
    samples are reproducible (for the same requests, options and engine batch size) and the global RNG is left
    as it was; None draws from and advances the global RNG; ``return_logprobs``: also return each generated
    token's log-probability under the untempered policy.

    Raises ``ValueError`` / ``TypeError`` for values outside these ranges or of the wrong type."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 600
    stop_token_ids: tuple[int, ...] = ()
    seed: Optional[int] = None
    return_logprobs: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"SamplingOptions: n (responses per request) must be an int >= 1, got {self.n!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingOptions: max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if (not isinstance(self.temperature, numbers.Real) or isinstance(self.temperature, bool)
                or not math.isfinite(self.temperature) or self.temperature < 0):
            raise ValueError(f"SamplingOptions: temperature must be a finite number >= 0, got {self.temperature!r}")
        if (not isinstance(self.top_p, numbers.Real) or isinstance(self.top_p, bool)
                or not 0 < self.top_p <= 1):
            raise ValueError(f"SamplingOptions: top_p must lie in (0, 1], got {self.top_p!r}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"SamplingOptions: temperature 0 is greedy decoding; n={self.n} would return {self.n} "
                             "identical responses (sample with temperature > 0, or n=1)")
        if self.temperature == 0 and self.top_p != 1:
            raise ValueError(f"SamplingOptions: top_p={self.top_p} has no effect with temperature 0 (greedy)")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"SamplingOptions: seed must be None or an int >= 0, got {self.seed!r}")
        if not isinstance(self.return_logprobs, bool):
            raise TypeError(f"SamplingOptions: return_logprobs must be a bool, got {self.return_logprobs!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Sequence):
            raise TypeError(f"SamplingOptions: stop_token_ids must be a sequence of ints, got "
                            f"{type(self.stop_token_ids).__name__}")
        bad = [v for v in self.stop_token_ids if not _is_int(v) or v < 0]
        if bad:
            raise ValueError(f"SamplingOptions: stop_token_ids must be token ids (ints >= 0), got {bad}")
        object.__setattr__(self, "stop_token_ids", tuple(int(v) for v in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """One prompt: ``memory`` (a ``Memory``, checked against the compressor's fingerprint, or embeddings
    ``[n_chunks, d]`` floating point, e.g. read from a block store, or None: no memory block, the decoder reads
    ``prefix + prompt`` as plain tokens), ``prompt`` (text or token ids: the compressor's ``tokenize`` rule) after
    the memory block, and an optional ``prefix`` before it (e.g. ChatML system and user headers).

    Raises ``TypeError`` for a memory that is none of these, or a prompt / prefix that is not text or token ids,
    ``ValueError`` for embeddings that are not 2-D."""

    memory: Optional[Union[Memory, torch.Tensor]]
    prompt: TextOrIds
    prefix: Optional[TextOrIds] = None

    def __post_init__(self) -> None:
        if self.memory is None:
            pass
        elif isinstance(self.memory, torch.Tensor):
            if self.memory.dim() != 2:
                raise ValueError(f"GenerationRequest: memory embeddings must be [n_chunks, d], got shape "
                                 f"{tuple(self.memory.shape)}")
            if not self.memory.is_floating_point():
                raise TypeError(f"GenerationRequest: memory embeddings must be floating point, got "
                                f"{self.memory.dtype}")
        elif not isinstance(self.memory, Memory):
            raise TypeError(f"GenerationRequest: memory must be a Memory, an [n, d] tensor or None, got "
                            f"{type(self.memory).__name__}")
        for name, v in (("prompt", self.prompt), ("prefix", self.prefix)):
            if v is None and name == "prefix":
                continue
            if not isinstance(v, (str, list, tuple, torch.Tensor)):
                raise TypeError(f"GenerationRequest: {name} must be a str or token ids, got {type(v).__name__}")


@dataclass
class GenerationResult:
    """One response: ``token_ids`` (the generated tokens, the stop token included when it ended the response:
    its probability is part of the policy the RL loss trains), ``text`` (decoded without special tokens and
    without the stop token), ``logprobs`` (``[len(token_ids)]`` float32 on CPU, the untempered policy's
    log-probabilities of those tokens, when ``return_logprobs``; else None), ``finish_reason`` ("stop": a stop
    token ended it; "length": ``max_new_tokens`` did)."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def check_request_memory(compressor: MemoryCompressor, i: int, m: Optional[Union[Memory, torch.Tensor]]) -> None:
    """Request ``i``'s memory belongs to ``compressor`` (a ``Memory``: fingerprint, chunk size and width; raw
    embeddings: width) and is finite. Raises ``MemoryMismatchError`` / ``ValueError`` naming the request. Every
    engine checks its requests with this before generating."""
    try:
        if m is None:
            return
        if isinstance(m, Memory):
            compressor.check_memory(m)
        elif m.shape[1] != compressor.hidden_size:
            raise MemoryMismatchError(f"memory embeddings are [{m.shape[0]}, {m.shape[1]}], this compressor's "
                                      f"width is {compressor.hidden_size}")
        emb = m.embeddings if isinstance(m, Memory) else m
        if not bool(torch.isfinite(emb).all()):
            raise ValueError("memory embeddings have non-finite values")
    except (MemoryMismatchError, ValueError) as exc:
        raise type(exc)(f"request {i}: {exc}") from exc


class GenerationEngine(abc.ABC):
    """The rollout interface: ``generate(requests, options)`` -> one list of ``options.n`` results per request, in
    request order."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest],
                 options: SamplingOptions) -> list[list[GenerationResult]]:
        raise NotImplementedError

    @staticmethod
    def check_call(requests: Sequence[GenerationRequest], options: SamplingOptions) -> list[GenerationRequest]:
        """The checks every engine runs first. Raises ``TypeError`` when ``requests`` is not a non-empty sequence of
        ``GenerationRequest`` or ``options`` is not ``SamplingOptions``, ``ValueError`` when it is empty."""
        if not isinstance(options, SamplingOptions):
            raise TypeError(f"generate: options must be SamplingOptions, got {type(options).__name__}")
        if isinstance(requests, GenerationRequest):
            raise TypeError("generate: pass a list of GenerationRequest (one request alone: [request])")
        if not isinstance(requests, Sequence):
            raise TypeError(f"generate: requests must be a list of GenerationRequest, got {type(requests).__name__}")
        if len(requests) == 0:
            raise ValueError("generate: no requests")
        for i, r in enumerate(requests):
            if not isinstance(r, GenerationRequest):
                raise TypeError(f"generate: request {i} is a {type(r).__name__}, not a GenerationRequest")
        return list(requests)

    # Shared by the engines that decode for a MemoryCompressor (``self.compressor``).
    def _check_memory(self, i: int, m: Optional[Union[Memory, torch.Tensor]]) -> None:
        check_request_memory(self.compressor, i, m)

    def _stop_ids(self, options: SamplingOptions) -> list[int]:
        """The tokenizer's EOS plus ``options.stop_token_ids``, sorted; ids outside the vocabulary are refused."""
        eos = self.compressor.tokenizer.eos_token_id
        stops = sorted(set(options.stop_token_ids) | ({eos} if eos is not None else set()))
        vocab = self.compressor.model.get_input_embeddings().weight.shape[0]
        bad = [s for s in stops if s >= vocab]
        if bad:
            raise ValueError(f"{type(self).__name__}: stop_token_ids {bad} lie outside the vocabulary [0, {vocab})")
        return stops


class _LogProbRecorder:
    """Forward hook on the causal LM while HF ``generate`` runs: each call's last-position logits are the raw
    logits ``generate`` samples from (before temperature and top-p). The token chosen from step t's logits is the
    ``input_ids`` of call t + 1 (the last one comes from the output), so only one step's log-softmax ``[B, V]``
    is held at a time -- unlike ``output_logits=True``, which keeps ``[steps, B, V]`` fp32 until the end (600 x
    64 rows x 152k vocabulary = 23 GB for Qwen2.5)."""

    def __init__(self) -> None:
        self.prev: Optional[torch.Tensor] = None
        self.logprobs: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []
        self.calls = 0

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        logits = output.logits if hasattr(output, "logits") else output[0]
        if self.prev is not None:
            ids = kwargs.get("input_ids")
            if ids is None or ids.dim() != 2 or ids.shape[1] != 1:
                raise RuntimeError("HFEngine: the decoding step did not feed back one token per row as input_ids; "
                                   "this transformers version generates differently than the log-probability "
                                   "recorder expects (run without return_logprobs, or pin transformers)")
            tok = ids[:, 0]
            self.tokens.append(tok)
            self.logprobs.append(self.prev.gather(1, tok[:, None])[:, 0])
        # fp32 before the softmax: bf16 logits would round the log-probabilities to ~3 significant digits.
        self.prev = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
        self.calls += 1

    def result(self, sequences: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` log-probabilities of ``sequences [B, T]``; checks that every step was seen."""
        T = sequences.shape[1]
        fed_back = torch.stack(self.tokens, dim=1) if self.tokens else sequences[:, :0]
        if self.prev is None or self.calls != T or not torch.equal(fed_back, sequences[:, : T - 1]):
            raise RuntimeError(f"HFEngine: log-probabilities do not line up with the generated tokens (the model "
                               f"ran {self.calls} forward passes for {T} tokens); this transformers version "
                               "generates differently than expected (run without return_logprobs)")
        self.logprobs.append(self.prev.gather(1, sequences[:, -1:])[:, 0])
        return torch.stack(self.logprobs, dim=1)


def _cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model``'s forward and ``generate`` take and return the KV cache: ``cache`` in recent
    transformers 5.x releases, ``past_key_values`` before (still accepted there, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class HFEngine(GenerationEngine):
    """Rollouts with Hugging Face ``generate`` on ``inputs_embeds`` from a ``MemoryCompressor``'s decoder.

    Each call: the requests' decoder inputs (``build_decoder_inputs``, left padding, prefixes), each row repeated
    ``n`` times, generated in batches of at most ``max_batch_size`` rows (None: all at once) with the model in
    eval mode (no LoRA dropout: the log-probabilities must be the policy's, not a dropped-out one's) and its
    training mode restored afterwards. Sampling follows ``SamplingOptions`` exactly: the model's own
    ``generation_config`` (e.g. Qwen2.5-Instruct's top_k 20, repetition_penalty 1.05) is set aside for the call,
    top-k is off. The decoder sees what ``MemoryCompressor.generate`` feeds it, so greedy results equal its.

    Raises ``MemoryMismatchError`` for a memory of another compressor or embeddings of another width (naming
    the request), ``ValueError`` for a stop token outside the vocabulary or ``max_batch_size < 1``, and what
    ``GenerationEngine.check_call`` raises."""

    def __init__(self, compressor: MemoryCompressor, *, max_batch_size: Optional[int] = None) -> None:
        if max_batch_size is not None and (not _is_int(max_batch_size) or max_batch_size < 1):
            raise ValueError(f"HFEngine: max_batch_size must be None or an int >= 1, got {max_batch_size!r}")
        self.compressor = compressor
        self.max_batch_size = max_batch_size

    @contextlib.contextmanager
    def _generation_state(self, seed: Optional[int]) -> Iterator[None]:
        """Eval mode, the model's generation_config set aside, a forked RNG when seeded; all restored after."""
        from transformers import GenerationConfig

        model = self.compressor.model
        was_training, saved_config = model.training, model.generation_config
        device = self.compressor.device
        rng = (torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
               if seed is not None else contextlib.nullcontext())
        try:
            with rng, torch.no_grad():
                if seed is not None:
                    torch.manual_seed(seed)
                model.eval()
                model.generation_config = GenerationConfig()
                yield
        finally:
            model.generation_config = saved_config
            model.train(was_training)

    def _config(self, options: SamplingOptions, stops: list[int]) -> Any:
        from transformers import GenerationConfig

        pad = self.compressor.tokenizer.pad_token_id
        common = dict(max_new_tokens=options.max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                      return_dict_in_generate=True, use_cache=True)
        if options.greedy:
            return GenerationConfig(do_sample=False, **common)
        # top_k=0 turns off transformers' global default of top-k 50: DAPO samples from the whole distribution.
        return GenerationConfig(do_sample=True, temperature=float(options.temperature), top_p=float(options.top_p),
                                top_k=0, **common)

    def generate(self, requests: Sequence[GenerationRequest],
                 options: SamplingOptions) -> list[list[GenerationResult]]:
        """``requests`` -> ``[len(requests)][options.n]`` results (see the class docstring)."""
        requests = self.check_call(requests, options)
        for i, r in enumerate(requests):
            self._check_memory(i, r.memory)
        stops = self._stop_ids(options)
        config = self._config(options, stops)
        rows = [i for i in range(len(requests)) for _ in range(options.n)]  # request index of each row
        step = self.max_batch_size or len(rows)
        results: list[list[GenerationResult]] = [[] for _ in requests]
        with self._generation_state(options.seed):
            for s in range(0, len(rows), step):
                chunk = rows[s:s + step]
                for i, res in zip(chunk, self._generate_rows([requests[i] for i in chunk], config, stops,
                                                             options.return_logprobs)):
                    results[i].append(res)
        return results

    def _generate_rows(self, reqs: list[GenerationRequest], config: Any, stops: list[int],
                       return_logprobs: bool) -> list[GenerationResult]:
        comp = self.compressor
        # Rows that repeat one request (the n samples of a prompt) share its prompt's forward pass: the unique
        # prompts are prefilled once and the KV cache is copied to their rows. Prefill is most of a rollout's cost
        # when responses are short next to the prompt: 32 prompts x 8 samples, 124 prompt positions, 8 new
        # tokens, the demo's tiny model on one CPU thread: 14.6 s -> 4.1 s per generation batch.
        index: dict[int, int] = {}
        row_request = [index.setdefault(id(r), len(index)) for r in reqs]  # [rows]: index into `unique`
        unique = list({id(r): r for r in reqs}.values())
        has_prefix = any(r.prefix is not None for r in unique)
        # No memory: zero embeddings, for which build_decoder_inputs lays out no memory block (no MEM tokens).
        none = torch.empty(0, comp.hidden_size, device=comp.device, dtype=comp.dtype)
        memories = [r.memory if r.memory is not None else none for r in unique]
        batch = comp.build_decoder_inputs(memories, [r.prompt for r in unique], padding_side="left",
                                          prefixes=[r.prefix if r.prefix is not None else [] for r in unique]
                                          if has_prefix else None)
        embeds, mask = batch.inputs_embeds, batch.attention_mask  # [U, L, d], [U, L]
        kwargs: dict[str, Any] = {}
        if len(unique) < len(reqs) and embeds.shape[1] > 1:
            # Prefill all but the last position (generate then runs that one and samples the first token from
            # it, so every sampled token's logits come from a call the recorder sees), then one cache row per row.
            name = _cache_argument(comp.model)
            out = comp.model(inputs_embeds=embeds[:, :-1], attention_mask=mask[:, :-1],
                             position_ids=batch.position_ids[:, :-1], use_cache=True)
            cache = getattr(out, name)
            cache.batch_select_indices(torch.tensor(row_request, device=embeds.device))
            kwargs[name] = cache
        rows = torch.tensor(row_request, device=embeds.device)
        embeds, mask = embeds[rows], mask[rows]  # [B, L, d], [B, L]
        recorder = _LogProbRecorder() if return_logprobs else None
        handle = comp.model.register_forward_hook(recorder, with_kwargs=True) if recorder is not None else None
        try:
            out = comp.model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        seqs = out.sequences  # [B, T]: with inputs_embeds alone, the new tokens only
        logprobs = recorder.result(seqs).cpu() if recorder is not None else None
        seqs = seqs.cpu()
        is_stop = torch.isin(seqs, torch.tensor(stops, dtype=seqs.dtype))
        has_stop = is_stop.any(dim=1).tolist()
        first_stop = is_stop.int().argmax(dim=1).tolist()
        T = seqs.shape[1]
        out_rows = []
        for b in range(len(reqs)):
            n = first_stop[b] + 1 if has_stop[b] else T
            if not has_stop[b] and n != config.max_new_tokens:  # something else ended it: not a "length" finish
                raise RuntimeError(f"HFEngine: a response ended after {n} of {config.max_new_tokens} tokens without "
                                   "a stop token")
            ids = seqs[b, :n].tolist()
            text_ids = ids[:-1] if has_stop[b] else ids
            text = comp.tokenizer.decode(text_ids, skip_special_tokens=True)
            lp = logprobs[b, :n].clone() if logprobs is not None else None
            out_rows.append(GenerationResult(ids, text, "stop" if has_stop[b] else "length", lp))
        return out_rows
