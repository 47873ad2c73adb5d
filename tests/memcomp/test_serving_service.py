"""memcomp.serving.service over real HTTP: a server started by the test on 127.0.0.1 (a free port) and stopped by
it, a real client (httpx). Encode -> store -> complete by id; encode-only -> upload elsewhere; the bad-input list
(oversized, non-finite, wrong-dtype, wrong-width embeddings; an unknown id; another compressor's memory; malformed
requests; the engine dying mid-request) each answered with a clear error while the service stays up; chat completions
through the tokenizer's chat template, with the memory by id, inline or none, and their bad requests.

The engine here is HFEngine on a tiny random compressor (the service logic does not depend on the engine;
tests/memcomp/test_serving_engine.py holds VLLMEngine to HFEngine's outputs). Needs FastAPI, uvicorn and httpx,
which come with vLLM: skipped without them."""

import base64
import copy
import json
import struct

import pytest
import torch
from testutil import TEXTS

pytest.importorskip("fastapi", reason="FastAPI is not installed (it comes with vLLM: scripts/setup_serving.sh)")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (it comes with vLLM: scripts/setup_serving.sh)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (it comes with vLLM)")

from memcomp import CompressorConfig, MemoryCompressor  # noqa: E402
from memcomp.rl.engine import GenerationRequest, HFEngine, SamplingOptions  # noqa: E402
from memcomp.serving.engine import EngineFailure  # noqa: E402
from memcomp.serving.service import MemoryService, ServerHandle, ServiceConfig, create_app, memory_to_base64  # noqa: E402

# A plain ChatML chat template (Qwen's, without its tool branches): /v1/chat/completions renders messages with it.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class FlakyEngine(HFEngine):
    """HFEngine that fails on demand, as a vLLM engine whose process died mid-request does."""

    fail_with = None

    def generate(self, requests, options):
        if self.fail_with is not None:
            raise self.fail_with
        return super().generate(requests, options)


@pytest.fixture(scope="module")
def served(base_tokenizer):
    from testutil import tiny_model

    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = CHATML
    comp = MemoryCompressor.from_base(tiny_model(tok), tok, CompressorConfig(chunk_size=4))
    engine = FlakyEngine(comp)
    service = MemoryService(comp, engine, ServiceConfig(max_memory_chunks=32, max_new_tokens=32,
                                                         max_request_bytes=1 << 20))
    server = ServerHandle(create_app(service))
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield comp, engine, service, client
    server.stop()


def b64_safetensors(tensors, meta):
    from safetensors.torch import save

    return base64.b64encode(save(tensors, metadata=meta)).decode()


def memory_meta(comp, num_tokens, **override):
    meta = {"format": "memcomp-memory", "format_version": "1", "num_tokens": str(num_tokens), "chunk_size": "4",
            "fingerprint": comp.fingerprint()}
    meta.update(override)
    return meta


def error_of(response, status):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["code"] == status and err["message"]
    return err


def test_encode_store_and_complete_by_id(served):
    comp, _, _, client = served
    r = client.post("/v1/memories", json={"text": TEXTS[0]})
    assert r.status_code == 200, r.text
    mem = r.json()
    assert mem["fingerprint"] == comp.fingerprint() and mem["n_chunks"] == -(-mem["num_tokens"] // 4)
    assert client.get(f"/v1/memories/{mem['id']}").json()["n_chunks"] == mem["n_chunks"]
    r = client.post("/v1/completions", json={"prompt": "Go on", "memory_id": mem["id"], "max_tokens": 6,
                                             "temperature": 0, "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    expected = HFEngine(comp).generate(
        [GenerationRequest(comp.encode(TEXTS[0]), "Go on")],
        SamplingOptions(temperature=0, max_new_tokens=6, return_logprobs=True))[0][0]
    assert choice["token_ids"] == expected.token_ids and choice["text"] == expected.text
    torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"]), expected.logprobs)
    assert client.delete(f"/v1/memories/{mem['id']}").json()["deleted"] is True
    error_of(client.get(f"/v1/memories/{mem['id']}"), 404)


def test_encode_only_memory_uploads_to_another_server(served):
    comp, _, _, client = served
    r = client.post("/v1/encode", json={"text": TEXTS[1]})
    assert r.status_code == 200, r.text
    blob = r.json()["memory"]
    up = client.post("/v1/memories/upload", json={"memory": blob})
    assert up.status_code == 200, up.text
    inline = client.post("/v1/completions", json={"prompt": "Go on", "memory": blob, "max_tokens": 5,
                                                  "temperature": 0}).json()
    by_id = client.post("/v1/completions", json={"prompt": "Go on", "memory_id": up.json()["id"], "max_tokens": 5,
                                                 "temperature": 0}).json()
    assert inline["choices"][0]["token_ids"] == by_id["choices"][0]["token_ids"]
    assert inline["choices"][0]["text"] == comp.generate(comp.encode(TEXTS[1]), "Go on", max_new_tokens=5)[0]


def test_bad_memories_are_refused(served, base_tokenizer):
    comp, _, _, client = served
    d = comp.hidden_size

    def upload(blob):
        return client.post("/v1/memories/upload", json={"memory": blob})

    ok = torch.randn(2, d)
    assert upload(b64_safetensors({"embeddings": ok}, memory_meta(comp, 8))).status_code == 200
    assert "non-finite" in error_of(upload(b64_safetensors({"embeddings": torch.full((2, d), float("nan"))},
                                                            memory_meta(comp, 8))), 422)["message"]
    assert "dtype" in error_of(upload(b64_safetensors({"embeddings": ok.double()}, memory_meta(comp, 8))),
                               422)["message"]
    assert "dtype" in error_of(upload(b64_safetensors({"embeddings": ok.int()}, memory_meta(comp, 8))),
                               422)["message"]
    assert "width" in error_of(upload(b64_safetensors({"embeddings": torch.randn(2, d + 1)}, memory_meta(comp, 8))),
                               422)["message"]
    error_of(upload(b64_safetensors({"embeddings": torch.randn(33, d)}, memory_meta(comp, 132))), 413)  # > 32 rows
    error_of(upload("A" * 100_000), 413)  # oversized before it is even decoded
    err = error_of(upload(b64_safetensors({"embeddings": ok}, memory_meta(comp, 8, fingerprint="0" * 16))), 422)
    assert err["type"] == "memory_mismatch" and "another compressor" in err["message"]
    tok = copy.deepcopy(base_tokenizer)
    from testutil import tiny_model

    other = MemoryCompressor.from_base(tiny_model(tok, seed=1), tok, CompressorConfig(chunk_size=4))
    err = error_of(upload(memory_to_base64(other.encode(TEXTS[0]))), 422)
    assert err["type"] == "memory_mismatch"
    error_of(upload(b64_safetensors({"embeddings": ok}, memory_meta(comp, 30))), 422)  # 30 tokens need 8 rows
    error_of(upload(b64_safetensors({"embeddings": ok, "extra": ok.clone()}, memory_meta(comp, 8))), 422)
    error_of(upload(b64_safetensors({"embeddings": ok}, {"format": "something-else"})), 422)
    error_of(upload("not base64 !!"), 422)
    # A pickle is never loaded: bytes that are not safetensors are refused as such.
    pickled = base64.b64encode(struct.pack("<Q", 10**9) + b"\x80\x04pickle").decode()
    assert "safetensors" in error_of(upload(pickled), 422)["message"]
    error_of(client.post("/v1/completions", json={"prompt": "Go on", "memory_id": "mem-unknown"}), 404)
    assert client.get("/health").json()["status"] == "ok"


def test_malformed_requests(served):
    _, _, _, client = served
    error_of(client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    error_of(client.post("/v1/completions", json=["a list"]), 400)
    error_of(client.post("/v1/completions", json={"prompt": 5}), 400)
    error_of(client.post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400)
    error_of(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10**6}), 400)
    error_of(client.post("/v1/completions", json={"prompt": "x", "stop": ["\n"]}), 400)
    error_of(client.post("/v1/completions", json={"prompt": "x", "memory_id": "a", "memory": "b"}), 400)
    error_of(client.post("/v1/memories", json={"text": ""}), 400)
    error_of(client.post("/v1/memories", json={"text": "word " * 300}), 413)  # > 32 chunks of 4 tokens
    error_of(client.post("/v1/memories", json={"text": "x" * (2 << 20)}), 413)  # body over 1 MiB
    assert client.get("/health").json()["status"] == "ok"


def test_engine_dying_mid_request_is_reported_and_the_service_stays_up(served):
    _, engine, _, client = served
    try:
        engine.fail_with = EngineFailure("VLLMEngine: generation failed: EngineDeadError: core died", dead=True)
        err = error_of(client.post("/v1/completions", json={"prompt": "Go on", "max_tokens": 3}), 503)
        assert "EngineDeadError" in err["message"] and err["type"] == "engine_unavailable"
        engine.fail_with = RuntimeError("segfault in a kernel")
        err = error_of(client.post("/v1/completions", json={"prompt": "Go on", "max_tokens": 3}), 503)
        assert "segfault" in err["message"]
        assert client.post("/v1/memories", json={"text": TEXTS[2]}).status_code == 200  # the service still serves
    finally:
        engine.fail_with = None
    r = client.post("/v1/completions", json={"prompt": "Go on", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 3


def test_encode_only_service_has_no_completions(served):
    comp, _, _, _ = served
    server = ServerHandle(create_app(MemoryService(comp, None)))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert client.get("/health").json()["engine"] is None
            blob = client.post("/v1/encode", json={"text": TEXTS[0]}).json()["memory"]
            error_of(client.post("/v1/completions", json={"prompt": "x"}), 404)
    finally:
        server.stop()
    data = base64.b64decode(blob)
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    assert header["__metadata__"]["fingerprint"] == comp.fingerprint()


def test_chat_completions_with_a_memory_by_id_inline_and_none(served):
    """The chat template renders the conversation; the memory block opens the last user message (the SFT layout:
    ``<|im_start|>user\n`` + memory + ``\n`` + question); the reply is what HFEngine generates for exactly that
    prefix and prompt, spelled out here by hand."""
    comp, _, _, client = served
    mem = client.post("/v1/memories", json={"text": TEXTS[0]}).json()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "text", "text": "What does it say?"}]}]
    history = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello.<|im_end|>\n")
    prefix, prompt = history + "<|im_start|>user\n", "\nWhat does it say?<|im_end|>\n<|im_start|>assistant\n"
    options = SamplingOptions(temperature=0, max_new_tokens=6, return_logprobs=True)
    expected = HFEngine(comp).generate([GenerationRequest(comp.encode(TEXTS[0]), prompt, prefix=prefix)],
                                       options)[0][0]
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "memory_id": mem["id"],
                                                  "max_tokens": 6, "temperature": 0, "logprobs": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "m"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["token_ids"] == expected.token_ids and choice["finish_reason"] == expected.finish_reason
    lps = choice["logprobs"]["content"]
    assert [x["token_id"] for x in lps] == expected.token_ids
    torch.testing.assert_close(torch.tensor([x["logprob"] for x in lps]), expected.logprobs)
    # The same memory inline (base64, as /v1/encode returns it) answers the same.
    blob = client.post("/v1/encode", json={"text": TEXTS[0]}).json()["memory"]
    inline = client.post("/v1/chat/completions", json={"messages": messages, "memory": blob,
                                                       "max_completion_tokens": 6, "temperature": 0}).json()
    assert inline["choices"][0]["token_ids"] == expected.token_ids
    # No memory: the whole rendered conversation is the prompt.
    plain = HFEngine(comp).generate([GenerationRequest(None, history + "<|im_start|>user\nWhat does it say?"
                                                       "<|im_end|>\n<|im_start|>assistant\n")], options)[0][0]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == plain.token_ids
    # The memory changed what the decoder saw: the reply's first-token log-probability moved (so a service that
    # dropped the memory could not have matched ``expected`` above).
    assert abs(float(expected.logprobs[0] - plain.logprobs[0])) > 1e-3


def test_chat_completions_bad_requests(served):
    _, _, _, client = served
    user = [{"role": "user", "content": "Hi"}]
    assert "messages" in error_of(client.post("/v1/chat/completions", json={"max_tokens": 3}), 400)["message"]
    error_of(client.post("/v1/chat/completions", json={"messages": []}), 400)
    err = error_of(client.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]}), 400)
    assert "role" in err["message"] and "'tool'" in err["message"]
    error_of(client.post("/v1/chat/completions", json={"messages": [{"content": "no role"}]}), 400)
    err = error_of(client.post("/v1/chat/completions", json={"messages": user + [
        {"role": "assistant", "content": "Hello."}]}), 400)
    assert "last message" in err["message"]
    error_of(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]}), 400)
    error_of(client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400)
    err = error_of(client.post("/v1/chat/completions", json={"messages": user, "memory_id": "mem-unknown"}), 404)
    assert err["type"] == "memory_not_found" and "mem-unknown" in err["message"]
    assert "stream" in error_of(client.post("/v1/chat/completions", json={"messages": user, "stream": True}),
                                400)["message"]
    assert "tools" in error_of(client.post("/v1/chat/completions", json={"messages": user, "tools": [
        {"type": "function", "function": {"name": "f"}}]}), 400)["message"]
    error_of(client.post("/v1/chat/completions", json={"messages": user, "stop": ["x"]}), 400)
    error_of(client.post("/v1/chat/completions", json={"messages": user, "memory": "not base64!"}), 422)
    r = client.post("/v1/chat/completions", json={"messages": user, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"  # still serving


def test_chat_completions_need_a_chat_template(served):
    comp, engine, service, _ = served
    tok = copy.deepcopy(comp.tokenizer)
    tok.chat_template = None
    bare = MemoryService(MemoryCompressor(comp.model, tok, comp.config, comp.projection), engine)
    server = ServerHandle(create_app(bare))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            err = error_of(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
                           400)
            assert "no chat template" in err["message"]
    finally:
        server.stop()
