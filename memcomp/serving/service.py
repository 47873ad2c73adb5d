"""The HTTP service behind ``memcomp serve``: encode documents into stored memories, generate from them.

FastAPI + uvicorn (both come with vLLM, and vLLM's own OpenAI-compatible server is built on them: one web stack
in the serving environment, typed request models from pydantic, a threadpool for the blocking engine calls).

Endpoints (errors are ``{"error": {"message", "type", "code"}}``, as OpenAI's):

* ``GET /health``: the compressor's fingerprint, whether an engine is attached and alive.
* ``POST /v1/memories`` ``{"text"}``: encode and store; returns ``{"id", "n_chunks", "num_tokens", "fingerprint"}``.
* ``POST /v1/memories/upload`` ``{"memory": base64 safetensors}``: store a memory encoded elsewhere (the file
  ``Memory.save`` writes); validated as below.
* ``GET`` / ``DELETE /v1/memories/{id}``.
* ``POST /v1/encode`` ``{"text"}``: encode only, return the memory as base64 safetensors (an encode-only service
  for a decoder served elsewhere: ``--encode-only``).
* ``POST /v1/completions``: OpenAI's completions request (``prompt``, ``max_tokens``, ``temperature``, ``top_p``,
  ``n``, ``seed``, ``logprobs``) plus ``memory_id`` or ``memory`` (base64), ``prefix`` (text before the memory
  block, e.g. the chat template's headers) and ``stop_token_ids``; string stops are refused (the engines stop on
  token ids).
* ``POST /v1/chat/completions``: OpenAI's chat request (``messages`` of system / user / assistant turns ending with
  the user's, ``max_tokens`` or ``max_completion_tokens``, ``temperature``, ``top_p``, ``n``, ``seed``,
  ``logprobs``) plus the memory as above, rendered with the decoder tokenizer's chat template; the memory block
  opens the last user message, as in the SFT data. Not streamed; tools refused.

Uploaded memories are checked before anything reaches the model: base64, a size bound on the bytes, safetensors
only (parsed by safetensors, never unpickled: vLLM's crafted-embedding CVE came from ``torch.load`` on client
tensors), one 2-D ``embeddings`` tensor of a floating dtype the decoder takes, the compressor's width, at most
``max_memory_chunks`` rows, finite values, and the memcomp metadata with this compressor's fingerprint (a memory of
another compressor is refused). Engine calls run one at a time (the engines are not thread-safe); an engine failure
answers 503 with the reason and the service stays up.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime, and they
# are imported inside create_app, where string annotations could not be resolved.
import argparse
import base64
import binascii
import json
import math
import secrets
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from memcomp.memory import FORMAT as MEMORY_FORMAT
from memcomp.memory import FORMAT_VERSION as MEMORY_FORMAT_VERSION
from memcomp.memory import Memory
from memcomp.rl.engine import GenerationEngine, GenerationRequest, SamplingOptions

ACCEPTED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ServiceConfig:
    """``max_memory_chunks``: most embeddings one memory may have (a size bound that holds before any tensor is
    built); ``max_text_chars``: longest document ``/v1/memories`` encodes; ``max_request_bytes``: largest request
    body; ``max_stored``: memories kept (oldest dropped first); ``max_new_tokens``: cap on ``max_tokens``."""

    max_memory_chunks: int = 4096
    max_text_chars: int = 1_000_000
    max_request_bytes: int = 64 << 20
    max_stored: int = 10_000
    max_new_tokens: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_memory_chunks", "max_text_chars", "max_request_bytes", "max_stored", "max_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ServiceConfig.{name} must be an int >= 1, got {v!r}")


class ServiceError(Exception):
    """An error answered to the client: HTTP ``status``, OpenAI-style ``kind`` and a message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def memory_to_base64(memory: Memory) -> str:
    """A memory as the base64 of the safetensors file ``Memory.save`` writes."""
    from safetensors.torch import save

    meta = {"format": MEMORY_FORMAT, "format_version": MEMORY_FORMAT_VERSION, "num_tokens": str(memory.num_tokens),
            "chunk_size": str(memory.chunk_size), "fingerprint": memory.fingerprint}
    data = save({"embeddings": memory.embeddings.detach().contiguous().cpu()}, metadata=meta)
    return base64.b64encode(data).decode("ascii")


def memory_from_base64(text: Any, compressor: Any, config: ServiceConfig) -> Memory:
    """Decode and validate an uploaded memory (see the module docstring). Raises ``ServiceError`` (413 for an
    oversized one, 422 for everything else wrong with it)."""
    if not isinstance(text, str):
        raise ServiceError(400, "invalid_request_error", "memory must be a base64 string")
    d = compressor.hidden_size
    # Largest legal file: the rows in fp32, plus a header; checked on the base64 length before decoding.
    limit = config.max_memory_chunks * d * 4 + 4096
    if len(text) > 4 * math.ceil(limit / 3) + 4:
        raise ServiceError(413, "memory_too_large", f"memory is larger than {config.max_memory_chunks} embeddings "
                                                    f"of width {d} allow")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError(422, "invalid_memory", f"memory is not valid base64: {exc}") from exc
    if len(data) < 8:
        raise ServiceError(422, "invalid_memory", "memory is not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, 1 << 20):
        raise ServiceError(422, "invalid_memory", "memory is not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServiceError(422, "invalid_memory", f"memory is not a safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise ServiceError(422, "invalid_memory", "memory is not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    if set(header) != {"embeddings"} or not isinstance(header["embeddings"], dict):
        raise ServiceError(422, "invalid_memory", f"memory must hold one tensor named 'embeddings', got "
                                                  f"{sorted(header)[:5]}")
    info = header["embeddings"]
    dtype, shape = info.get("dtype"), info.get("shape")
    if dtype not in ACCEPTED_DTYPES:
        raise ServiceError(422, "invalid_memory", f"memory embeddings have dtype {dtype}; accepted: "
                                                  f"{sorted(ACCEPTED_DTYPES)}")
    if not isinstance(shape, list) or len(shape) != 2:
        raise ServiceError(422, "invalid_memory", f"memory embeddings must be [n_chunks, {d}], got shape {shape}")
    if shape[1] != d:
        raise ServiceError(422, "invalid_memory", f"memory embeddings have width {shape[1]}, this compressor's is {d}")
    if shape[0] > config.max_memory_chunks:
        raise ServiceError(413, "memory_too_large", f"memory has {shape[0]} embeddings, the limit is "
                                                    f"{config.max_memory_chunks}")
    if meta.get("format") != MEMORY_FORMAT or meta.get("format_version") != MEMORY_FORMAT_VERSION:
        raise ServiceError(422, "invalid_memory", f"not a memcomp memory (format {meta.get('format')!r}, version "
                                                  f"{meta.get('format_version')!r})")
    if meta.get("fingerprint") != compressor.fingerprint():
        raise ServiceError(422, "memory_mismatch", f"memory fingerprint {meta.get('fingerprint')!r} is not this "
                                                   f"compressor's ({compressor.fingerprint()}): it was made by "
                                                   "another compressor; re-encode the text here")
    from safetensors.torch import load

    try:
        emb = load(data)["embeddings"]
        memory = Memory(emb, int(meta["num_tokens"]), int(meta["chunk_size"]), meta["fingerprint"])
    except Exception as exc:  # safetensors raises several types on corrupt data; Memory raises ValueError
        raise ServiceError(422, "invalid_memory", f"memory is not a valid memcomp memory: {exc}") from exc
    if not bool(torch.isfinite(emb).all()):
        raise ServiceError(422, "invalid_memory", "memory embeddings have non-finite values")
    try:
        compressor.check_memory(memory)
    except ValueError as exc:
        raise ServiceError(422, "memory_mismatch", str(exc)) from exc
    return memory.to(device=compressor.device, dtype=compressor.dtype)


class MemoryService:
    """The service's state, apart from the web layer: the compressor, the optional engine, the memory store and
    the lock that serializes model calls. ``engine`` None: an encode-only service."""

    def __init__(self, compressor: Any, engine: Optional[GenerationEngine] = None,
                 config: Optional[ServiceConfig] = None) -> None:
        if engine is not None and not isinstance(engine, GenerationEngine):
            raise TypeError(f"MemoryService: engine must be a GenerationEngine or None, got {type(engine).__name__}")
        self.compressor, self.engine, self.config = compressor, engine, config or ServiceConfig()
        self.memories: dict[str, Memory] = {}
        self.lock = threading.Lock()

    def encode(self, text: Any) -> Memory:
        if not isinstance(text, str) or not text:
            raise ServiceError(400, "invalid_request_error", "text must be a non-empty string")
        if len(text) > self.config.max_text_chars:
            raise ServiceError(413, "text_too_large", f"text has {len(text)} characters, the limit is "
                                                      f"{self.config.max_text_chars}")
        ids = self.compressor.tokenize(text)
        n_chunks = math.ceil(ids.numel() / self.compressor.config.chunk_size)
        if n_chunks > self.config.max_memory_chunks:
            raise ServiceError(413, "text_too_large", f"text makes {n_chunks} embeddings, the limit is "
                                                      f"{self.config.max_memory_chunks}")
        with self.lock:
            return self.compressor.encode(ids)

    def store(self, memory: Memory) -> str:
        while len(self.memories) >= self.config.max_stored:
            self.memories.pop(next(iter(self.memories)))
        key = "mem-" + secrets.token_hex(12)
        self.memories[key] = memory
        return key

    def lookup(self, key: Any) -> Memory:
        memory = self.memories.get(key) if isinstance(key, str) else None
        if memory is None:
            raise ServiceError(404, "memory_not_found", f"no stored memory with id {key!r}")
        try:
            self.compressor.check_memory(memory)  # the weights may have changed since it was stored
        except ValueError as exc:
            raise ServiceError(422, "memory_mismatch", str(exc)) from exc
        return memory

    def _memory(self, body: dict[str, Any]) -> Optional[Memory]:
        """The request's memory: ``memory_id`` (stored), ``memory`` (base64, validated) or none."""
        if self.engine is None:
            raise ServiceError(404, "not_found", "this is an encode-only service: no decoder to generate with")
        if body.get("memory_id") is not None and body.get("memory") is not None:
            raise ServiceError(400, "invalid_request_error", "give memory_id or memory, not both")
        if body.get("memory_id") is not None:
            return self.lookup(body["memory_id"])
        if body.get("memory") is not None:
            return memory_from_base64(body["memory"], self.compressor, self.config)
        return None

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI completions request with a memory -> the completions response."""
        memory = self._memory(body)
        results = self._generate(body, memory, body["prompt"], body.get("prefix"), body.get("max_tokens") or 16)
        choices = []
        for k, r in enumerate(results):
            choice: dict[str, Any] = {"index": k, "text": r.text, "finish_reason": r.finish_reason,
                                      "token_ids": r.token_ids, "logprobs": None}
            if r.logprobs is not None:
                choice["logprobs"] = {"token_logprobs": r.logprobs.tolist(), "tokens": r.token_ids}
            choices.append(choice)
        n_tokens = sum(r.num_tokens for r in results)
        return {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "model": body.get("model"),
                "choices": choices, "usage": {"completion_tokens": n_tokens}}

    def chat_prompt(self, messages: Any, with_memory: bool) -> tuple[Optional[str], str]:
        """OpenAI chat ``messages`` -> (prefix, prompt) texts through the decoder tokenizer's chat template, with the
        generation prompt. With a memory, the memory block goes at the start of the last user message, as the SFT
        data lays it out (ChatML: ``...<|im_start|>user\n`` + memory + ``\n`` + question + ``<|im_end|>...``):
        the prefix is the rendered text before it, the prompt the text after it. Without one, the prefix is None.

        Messages: a non-empty list of ``{"role": "system" | "user" | "assistant", "content": str}`` (content may
        also be a list of ``{"type": "text", "text": str}`` parts), ending with a user message. Raises
        ``ServiceError`` (400) for anything else, or when the tokenizer has no chat template."""
        def bad(message: str) -> ServiceError:
            return ServiceError(400, "invalid_request_error", message)

        if not isinstance(messages, list) or not messages:
            raise bad("messages must be a non-empty list of {role, content} objects")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise bad(f"messages[{i}] must be an object with role and content")
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise bad(f"messages[{i}].role is {role!r}; accepted roles: {', '.join(CHAT_ROLES)} (no tools)")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise bad(f"messages[{i}].content parts must all be {{'type': 'text', 'text': str}}")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise bad(f"messages[{i}].content must be a string")
            clean.append({"role": role, "content": content})
        if clean[-1]["role"] != "user":
            raise bad(f"the last message must be the user's (the reply is generated after it), got "
                      f"{clean[-1]['role']!r}")
        tok = self.compressor.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ServiceError(400, "invalid_request_error", "the decoder's tokenizer has no chat template: use "
                                                             "/v1/completions with prefix and prompt")
        # A marker the messages cannot contain, rendered in place of the memory block, then split at.
        marker = "<memcomp-memory-" + secrets.token_hex(16) + ">"
        if with_memory:
            clean[-1] = {"role": "user", "content": marker + "\n" + clean[-1]["content"]}
        try:
            text = tok.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (e.g. role alternation) raise jinja's errors
            raise bad(f"the chat template refused the messages: {exc}") from exc
        if not with_memory:
            return None, text
        if text.count(marker) != 1:
            raise ServiceError(500, "internal_error", "the chat template did not render the last user message once")
        prefix, prompt = text.split(marker)
        return prefix, prompt

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI chat completions request with a memory -> the chat completion response (not streamed)."""
        unsupported = [k for k in ("tools", "tool_choice", "functions", "function_call", "top_logprobs")
                       if body.get(k) not in (None, [], 0)]
        if body.get("stream"):
            unsupported.append("stream")
        if body.get("response_format") not in (None, {"type": "text"}):
            unsupported.append("response_format")
        if unsupported:
            raise ServiceError(400, "invalid_request_error", f"not supported here: {unsupported}")
        memory = self._memory(body)
        prefix, prompt = self.chat_prompt(body.get("messages"), memory is not None)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        results = self._generate(body, memory, prompt, prefix, max_tokens)
        tok = self.compressor.tokenizer
        choices = []
        for k, r in enumerate(results):
            logprobs = None
            if r.logprobs is not None:
                logprobs = {"content": [{"token": tok.decode([t]), "token_id": t, "logprob": lp, "top_logprobs": []}
                                        for t, lp in zip(r.token_ids, r.logprobs.tolist())]}
            choices.append({"index": k, "message": {"role": "assistant", "content": r.text},
                            "finish_reason": r.finish_reason, "logprobs": logprobs, "token_ids": r.token_ids})
        return {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"), "choices": choices,
                "usage": {"completion_tokens": sum(r.num_tokens for r in results)}}

    def _generate(self, body: dict[str, Any], memory: Optional[Memory], prompt: Any, prefix: Any,
                  max_tokens: Any) -> list[Any]:
        """One engine call for one request: sampling options from ``body``; engine errors as ``ServiceError``."""
        from memcomp.serving.engine import EngineFailure

        if body.get("stop") is not None:
            raise ServiceError(400, "invalid_request_error", "string stops are not supported; use stop_token_ids")
        if isinstance(max_tokens, int) and max_tokens > self.config.max_new_tokens:
            raise ServiceError(400, "invalid_request_error", f"max_tokens {max_tokens} > the limit "
                                                             f"{self.config.max_new_tokens}")
        want_logprobs = body.get("logprobs") is not None and body.get("logprobs") is not False
        try:
            options = SamplingOptions(n=body.get("n") or 1, temperature=body.get("temperature", 1.0),
                                      top_p=body.get("top_p", 1.0), max_new_tokens=max_tokens,
                                      stop_token_ids=tuple(body.get("stop_token_ids") or ()), seed=body.get("seed"),
                                      return_logprobs=want_logprobs)
            request = GenerationRequest(memory, prompt, prefix=prefix)
        except (TypeError, ValueError) as exc:
            raise ServiceError(400, "invalid_request_error", str(exc)) from exc
        try:
            with self.lock:
                results = self.engine.generate([request], options)[0]
        except EngineFailure as exc:
            raise ServiceError(503, "engine_unavailable", str(exc)) from exc
        except (TypeError, ValueError) as exc:  # bad prompt ids, a request longer than the engine takes
            raise ServiceError(400, "invalid_request_error", str(exc)) from exc
        except Exception as exc:  # the engine broke mid-request: tell the client, keep serving
            raise ServiceError(503, "engine_error", f"generation failed: {type(exc).__name__}: {exc}") from exc
        return results


def create_app(service: MemoryService) -> Any:
    """The FastAPI application of ``service``. Raises ``ImportError`` naming the install when FastAPI is missing."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
    except ImportError as exc:
        raise ImportError("memcomp serve needs FastAPI and uvicorn (they come with vLLM: scripts/setup_serving.sh, "
                          "or pip install fastapi uvicorn)") from exc

    app = FastAPI(title="memcomp", version="1")

    def error(status: int, kind: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error(exc.status, exc.kind, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, "invalid_request_error", f"malformed request: {exc.errors()[:3]}")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    @app.middleware("http")
    async def _size_bound(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > service.config.max_request_bytes):
            return error(413, "request_too_large", f"request body over {service.config.max_request_bytes} bytes")
        return await call_next(request)

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServiceError(400, "invalid_request_error", f"malformed JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ServiceError(400, "invalid_request_error", "the request body must be a JSON object")
        return body

    def describe(key: str, m: Memory) -> dict[str, Any]:
        return {"id": key, "object": "memory", "n_chunks": m.n_chunks, "num_tokens": m.num_tokens,
                "fingerprint": m.fingerprint}

    @app.get("/health")
    def health() -> dict[str, Any]:
        engine = service.engine
        alive = None if engine is None else bool(getattr(engine, "alive", True))
        return {"status": "ok", "fingerprint": service.compressor.fingerprint(), "engine": type(engine).__name__
                if engine is not None else None, "engine_alive": alive, "memories": len(service.memories)}

    @app.post("/v1/memories")
    async def create_memory(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        from starlette.concurrency import run_in_threadpool

        memory = await run_in_threadpool(service.encode, body.get("text"))
        return describe(service.store(memory), memory)

    @app.post("/v1/memories/upload")
    async def upload_memory(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        memory = memory_from_base64(body.get("memory"), service.compressor, service.config)
        return describe(service.store(memory), memory)

    @app.get("/v1/memories/{key}")
    def get_memory(key: str) -> dict[str, Any]:
        return describe(key, service.lookup(key))

    @app.delete("/v1/memories/{key}")
    def delete_memory(key: str) -> dict[str, Any]:
        service.lookup(key)
        del service.memories[key]
        return {"id": key, "object": "memory", "deleted": True}

    @app.post("/v1/encode")
    async def encode(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        from starlette.concurrency import run_in_threadpool

        memory = await run_in_threadpool(service.encode, body.get("text"))
        return {"object": "memory", "n_chunks": memory.n_chunks, "num_tokens": memory.num_tokens,
                "fingerprint": memory.fingerprint, "memory": memory_to_base64(memory)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(service.chat, body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        if not isinstance(body.get("prompt"), str):
            raise ServiceError(400, "invalid_request_error", "prompt must be a string")
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(service.complete, body)

    return app


class ServerHandle:
    """A uvicorn server running ``app`` in a background thread on ``host``; ``url``; ``stop()`` shuts it down."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))  # port 0: the OS picks a free one, known before the server starts
        self.host, self.port = host, self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self.thread.start()
        import time

        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"memcomp serve: the server did not start on {self.url}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self._sock.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``memcomp serve``: load a saved compressor, start an engine (vLLM by default), serve over HTTP."""
    p = argparse.ArgumentParser(prog="memcomp serve", description=__doc__.split("\n\n")[0])
    p.add_argument("compressor", help="a folder written by MemoryCompressor.save_pretrained")
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm",
                   help="vllm (default) or hf (HF generate on inputs_embeds: no vLLM needed, slower)")
    p.add_argument("--encode-only", action="store_true", help="no decoder: serve /v1/memories and /v1/encode")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="the compressor's device (default cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    p.add_argument("--max-memory-chunks", type=int, default=ServiceConfig.max_memory_chunks)
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM: longest prompt + response")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs to shard the decoder over")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="vLLM: KV cache size")
    args = p.parse_args(argv)
    from memcomp.compressor import MemoryCompressor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    comp = MemoryCompressor.from_pretrained(args.compressor, device=device, dtype=dtype).eval()
    engine: Optional[GenerationEngine] = None
    if not args.encode_only:
        if args.engine == "vllm":
            from memcomp.serving.engine import VLLMEngine

            engine = VLLMEngine(comp, max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size,
                                kv_cache_memory_bytes=args.kv_cache_memory_bytes)
        else:
            from memcomp.rl.engine import HFEngine

            engine = HFEngine(comp)
    service = MemoryService(comp, engine, ServiceConfig(max_memory_chunks=args.max_memory_chunks))
    import uvicorn

    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
    finally:
        if engine is not None and hasattr(engine, "close"):
            engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
