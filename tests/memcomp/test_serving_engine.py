"""memcomp.serving.VLLMEngine against HFEngine (HF ``generate`` on ``inputs_embeds``): the same greedy tokens, texts
and finish reasons for the same memories and prompts, on a tiny random Qwen2 and on SmolLM2-135M-Instruct, both
wrapper layouts; log-probabilities of the untempered policy within ``LOGPROB_ATOL``; seeded sampling reproducible;
weights refreshed in the running engine; bad input refused before it reaches vLLM.

Needs vLLM (the serving environment: scripts/setup_serving.sh); skipped without it. One engine per model per module
(vLLM starts in ~20 s on a CPU): the layouts share it, as they share the decoder's weights (the layout is how the
compressor lays out prompt embeddings, not part of the weights or of the fingerprint).

Measured gap between the two engines' log-probabilities of the same tokens, fp32 on a CPU: see LOGPROB_ATOL."""

import copy
import dataclasses

import pytest
import torch
from testutil import TEXTS

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup_serving.sh builds the serving environment)")

from memcomp import CompressorConfig, MemoryCompressor  # noqa: E402
from memcomp.memory import MemoryMismatchError  # noqa: E402
from memcomp.rl.engine import GenerationRequest, HFEngine, SamplingOptions  # noqa: E402
from memcomp.serving import VLLMEngine  # noqa: E402

# vLLM's CPU attention and HF's SDPA sum in different orders: the two fp32 log-probabilities of one token differ by
# float rounding only. Measured max |diff| on these models: ~1e-5 (tiny Qwen2), ~1e-4 (SmolLM2, 30 layers).
LOGPROB_ATOL = 2e-3
PROMPTS = ["Go on", "Write the memorised text back out, word for word."]
CHAT_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
CHAT_SUFFIX = "\nWhat does this say?<|im_end|>\n<|im_start|>assistant\n"


def tiny_qwen2(tokenizer, seed=0):
    """Head width 64: vLLM's CPU attention kernels take a fixed set of head sizes (testutil's 12 is not one)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
                                   max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def with_layout(comp, wrapper):
    """The same decoder, embeddings and projection under the other wrapper layout."""
    return MemoryCompressor(comp.model, comp.tokenizer, dataclasses.replace(comp.config, wrapper=wrapper),
                            comp.projection)


@pytest.fixture(scope="module")
def tiny(base_tokenizer):
    tok = copy.deepcopy(base_tokenizer)
    comp = MemoryCompressor.from_base(tiny_qwen2(tok), tok, CompressorConfig(chunk_size=4))
    with torch.no_grad():
        comp.projection.weight.add_(0.05 * torch.randn_like(comp.projection.weight))
    engine = VLLMEngine(comp, max_model_len=256, kv_cache_memory_bytes=32 << 20, enforce_eager=True)
    yield comp, engine
    engine.close()


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_loaded):
    model, tok = copy.deepcopy(smollm2_loaded[0]), copy.deepcopy(smollm2_loaded[1])
    comp = MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=16))
    engine = VLLMEngine(comp, max_model_len=512, kv_cache_memory_bytes=128 << 20, enforce_eager=True)
    yield comp, engine
    engine.close()


def assert_same_as_hf(comp, engine, requests, options):
    """Tokens, texts and finish reasons equal HFEngine's; log-probabilities within LOGPROB_ATOL. Returns the
    largest log-probability gap."""
    ours = engine.generate(requests, options)
    ref = HFEngine(comp).generate(requests, options)
    gap = 0.0
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert [x.token_ids for x in o] == [x.token_ids for x in r], f"request {i}"
        assert [x.text for x in o] == [x.text for x in r]
        assert [x.finish_reason for x in o] == [x.finish_reason for x in r]
        if options.return_logprobs:
            for x, y in zip(o, r):
                assert x.logprobs.dtype == torch.float32 and x.logprobs.shape == (x.num_tokens,)
                torch.testing.assert_close(x.logprobs, y.logprobs, rtol=0, atol=LOGPROB_ATOL)
                gap = max(gap, float((x.logprobs - y.logprobs).abs().max()))
    return gap


def requests_for(comp, prompts=PROMPTS, prefix=None):
    mems = comp.encode(TEXTS[:2])
    return [GenerationRequest(mems[0], prompts[0], prefix=prefix),
            GenerationRequest(mems[1].embeddings, prompts[1], prefix=prefix),  # raw embeddings
            GenerationRequest(None, prompts[1], prefix=prefix)]  # plain text, no memory block


@pytest.mark.parametrize("wrapper", ["per_embedding", "per_block"])
def test_greedy_parity_tiny_qwen2(tiny, wrapper):
    comp, engine = tiny
    engine.compressor = view = with_layout(comp, wrapper)
    try:
        options = SamplingOptions(temperature=0, max_new_tokens=8, return_logprobs=True)
        gap = assert_same_as_hf(view, engine, requests_for(view) + requests_for(view, prefix="<|endoftext|>"), options)
    finally:
        engine.compressor = comp
    print(f"tiny qwen2 {wrapper}: max log-prob gap {gap:.2e}")


@pytest.mark.parametrize("wrapper", ["per_embedding", "per_block"])
def test_greedy_parity_smollm2(smollm2_engine, wrapper):
    comp, engine = smollm2_engine
    engine.compressor = view = with_layout(comp, wrapper)
    try:
        options = SamplingOptions(temperature=0, max_new_tokens=12, return_logprobs=True)
        gap = assert_same_as_hf(view, engine, requests_for(view, [CHAT_SUFFIX] * 2, prefix=CHAT_PREFIX), options)
    finally:
        engine.compressor = comp
    print(f"smollm2 {wrapper}: max log-prob gap {gap:.2e}")


def test_stop_token_ends_the_response_and_is_kept(tiny):
    comp, engine = tiny
    req = requests_for(comp)[:1]
    free = engine.generate(req, SamplingOptions(temperature=0, max_new_tokens=8))[0][0]
    stop = free.token_ids[3]
    cut = free.token_ids.index(stop) + 1
    out = engine.generate(req, SamplingOptions(temperature=0, max_new_tokens=8, stop_token_ids=[stop]))[0][0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:cut]
    assert out.text == comp.tokenizer.decode(free.token_ids[:cut - 1], skip_special_tokens=True)
    assert_same_as_hf(comp, engine, req, SamplingOptions(temperature=0, max_new_tokens=8, stop_token_ids=[stop]))


@torch.no_grad()
def teacher_forced_logprobs(comp, req, token_ids):
    batch = comp.build_decoder_inputs([req.memory], [req.prompt], [token_ids], padding_side="right",
                                      append_eos=False)
    logits = comp.model(**batch.model_kwargs()).logits[0].float()
    start = batch.inputs_embeds.shape[1] - len(token_ids)
    logp = torch.log_softmax(logits[start - 1:-1], dim=-1)
    return logp.gather(1, torch.tensor(token_ids)[:, None])[:, 0]


def test_seeded_sampling_is_reproducible_and_logprobs_are_the_untempered_policy(tiny):
    comp, engine = tiny
    reqs = requests_for(comp)[:2]
    options = SamplingOptions(n=3, temperature=0.7, top_p=0.9, max_new_tokens=6, seed=123, return_logprobs=True)
    a = engine.generate(reqs, options)
    b = engine.generate(reqs, options)
    assert [[x.token_ids for x in r] for r in a] == [[x.token_ids for x in r] for r in b]
    assert [len(r) for r in a] == [3, 3]
    assert len({tuple(x.token_ids) for r in a for x in r}) > 1  # samples, not one greedy answer copied
    for req, per_request in zip(reqs, a):
        for x in per_request:
            # Temperature 0.7 and top-p 0.9 shape the samples, not the log-probabilities: raw_logprobs mode.
            torch.testing.assert_close(x.logprobs, teacher_forced_logprobs(comp, req, x.token_ids),
                                       rtol=0, atol=LOGPROB_ATOL)


def test_update_weights_reaches_the_running_engine(tiny):
    comp, engine = tiny
    req = requests_for(comp)[2:]  # no memory: the memory's fingerprint would change with the weights
    options = SamplingOptions(temperature=0, max_new_tokens=8, return_logprobs=True)
    before = engine.generate(req, options)[0][0]
    saved = {k: v.clone() for k, v in comp.model.state_dict().items()}
    try:
        with torch.no_grad():
            for name, p in comp.model.named_parameters():
                if "mlp" in name or "lm_head" in name:
                    p.mul_(-1.5)
        with pytest.raises(RuntimeError, match="update_weights"):
            engine.generate(req, options)  # stale decoder: refused, not silently served
        engine.update_weights()
        after = engine.generate(req, options)[0][0]
        assert after.token_ids != before.token_ids
        assert_same_as_hf(comp, engine, req, options)
    finally:
        comp.model.load_state_dict(saved)
        engine.update_weights()
    assert engine.generate(req, options)[0][0].token_ids == before.token_ids


def test_update_weights_of_a_tied_model_reaches_the_lm_head(smollm2_engine):
    """SmolLM2 ties its LM head to the embedding table. vLLM's in-place reload does not refresh a tied head, so the
    engine's checkpoint unties it: after a push that changes the table, vLLM's logits (the head) follow it too."""
    comp, engine = smollm2_engine
    assert engine._tied is not None and comp.model.lm_head.weight is comp.model.get_input_embeddings().weight
    req = [GenerationRequest(None, CHAT_SUFFIX, prefix=CHAT_PREFIX)]
    options = SamplingOptions(temperature=0, max_new_tokens=6, return_logprobs=True)
    before = engine.generate(req, options)[0][0]
    table = comp.model.get_input_embeddings().weight
    saved = table.detach().clone()
    try:
        with torch.no_grad():  # the prompt's embeddings and the head both change
            table.add_(0.5 * saved.std() * torch.randn(saved.shape, generator=torch.Generator().manual_seed(0)))
        engine.update_weights()
        after = engine.generate(req, options)[0][0]
        assert_same_as_hf(comp, engine, req, options)
        moved = float((after.logprobs[0] - before.logprobs[0]).abs())
        assert after.token_ids != before.token_ids or moved > 10 * LOGPROB_ATOL, moved  # the push changed vLLM
    finally:
        with torch.no_grad():
            table.copy_(saved)
        engine.update_weights()
    assert engine.generate(req, options)[0][0].token_ids == before.token_ids


def test_bad_input_is_refused_before_vllm(tiny, base_tokenizer):
    comp, engine = tiny
    tok = copy.deepcopy(base_tokenizer)
    other = MemoryCompressor.from_base(tiny_qwen2(tok, seed=1), tok, CompressorConfig(chunk_size=4))
    greedy = SamplingOptions(temperature=0, max_new_tokens=4)
    with pytest.raises(MemoryMismatchError, match="request 0.*another compressor"):
        engine.generate([GenerationRequest(other.encode(TEXTS[0]), "Go on")], greedy)
    with pytest.raises(MemoryMismatchError, match="width"):
        engine.generate([GenerationRequest(torch.zeros(2, 64), "Go on")], greedy)
    with pytest.raises(ValueError, match="non-finite"):
        engine.generate([GenerationRequest(torch.full((2, 128), float("nan")), "Go on")], greedy)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([GenerationRequest(None, "Go on")], SamplingOptions(temperature=0, max_new_tokens=300))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([GenerationRequest(None, "Go on")], SamplingOptions(temperature=0, stop_token_ids=[10**6]))
    state = {k: v for k, v in comp.model.state_dict().items() if "lm_head" not in k}
    with pytest.raises(ValueError, match="missing.*lm_head"):
        engine.update_weights(state)
    bad = dict(comp.model.state_dict(), **{"lm_head.weight": torch.full_like(comp.model.lm_head.weight, float("inf"))})
    with pytest.raises(ValueError, match="non-finite"):
        engine.update_weights(bad)
    with pytest.raises(ValueError, match="set by the engine"):
        VLLMEngine(comp, enable_prompt_embeds=False)
    assert engine.alive and engine.generate([GenerationRequest(None, "Go on")], greedy)[0][0].num_tokens == 4

