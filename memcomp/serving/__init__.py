"""Serving compressed memory: ``VLLMEngine`` (the rollout / reasoner engine interface of ``memcomp.rl.engine`` on
vLLM's prompt embeddings) and ``memcomp.serving.service`` (the HTTP service behind ``memcomp serve``: encode
documents into stored memories, generate from them, OpenAI-compatible where the request fits).

vLLM is optional and heavy: nothing here imports it until an engine is built (``VLLMEngine`` names the install
command when it is missing). The service needs FastAPI and uvicorn, which vLLM brings with it."""

from memcomp.serving.engine import EngineFailure, VLLMEngine, kv_cache_bytes, prompt_embeds_batch, vllm_available

__all__ = ["EngineFailure", "VLLMEngine", "kv_cache_bytes", "prompt_embeds_batch", "vllm_available"]
