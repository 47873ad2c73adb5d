"""memcomp.rl.engine: the HF rollout engine on a tiny random Qwen2 compressor -- greedy equals
``MemoryCompressor.generate``, n responses per request, log-probabilities equal a teacher-forced forward pass,
lengths and finish reasons, the model's own generation settings set aside, bad input refused."""

import dataclasses

import pytest
import torch
from testutil import TEXTS

from memcomp.memory import MemoryMismatchError
from memcomp.rl.engine import GenerationEngine, GenerationRequest, GenerationResult, HFEngine, SamplingOptions

PROMPTS = ["Go on", "Write the memorised text back out, word for word."]  # different lengths: left padding


@pytest.fixture
def setup(make_compressor):
    comp = make_compressor()
    mems = comp.encode(TEXTS[:2])
    return comp, mems, [GenerationRequest(m, p) for m, p in zip(mems, PROMPTS)]


@torch.no_grad()
def teacher_forced_logits(comp, req, token_ids):
    """``[T, V]`` fp32 logits predicting each of ``token_ids`` from one forward pass over the whole sequence,
    alone (no padding)."""
    batch = comp.build_decoder_inputs([req.memory], [req.prompt], [token_ids], padding_side="right",
                                      append_eos=False, prefixes=[req.prefix] if req.prefix is not None else None)
    logits = comp.model(**batch.model_kwargs()).logits[0].float()
    start = batch.inputs_embeds.shape[1] - len(token_ids)
    return logits[start - 1:-1]


def teacher_forced_logprobs(comp, req, token_ids):
    """log p(token_t | prefix, memory, prompt, tokens < t) at temperature 1."""
    logp = torch.log_softmax(teacher_forced_logits(comp, req, token_ids), dim=-1)
    return logp.gather(1, torch.tensor(token_ids)[:, None])[:, 0]


def check_logprobs(comp, requests, results):
    for req, per_request in zip(requests, results):
        for r in per_request:
            assert r.logprobs is not None and r.logprobs.dtype == torch.float32 and r.logprobs.shape == (r.num_tokens,)
            torch.testing.assert_close(r.logprobs, teacher_forced_logprobs(comp, req, r.token_ids), rtol=0, atol=1e-5)


def test_greedy_equals_compressor_generate(setup):
    comp, mems, reqs = setup
    prefix = "<|im_start|>user\n"
    reqs = reqs + [GenerationRequest(mems[0].embeddings, PROMPTS[1], prefix=prefix)]  # raw embeddings, a prefix
    out = HFEngine(comp).generate(reqs, SamplingOptions(temperature=0, max_new_tokens=8))
    expected = comp.generate(mems, PROMPTS, max_new_tokens=8) + comp.generate(
        [mems[0]], [PROMPTS[1]], prefixes=[prefix], max_new_tokens=8)
    assert [len(o) for o in out] == [1, 1, 1]
    assert [o[0].text for o in out] == expected
    assert all(o[0].finish_reason == "length" and o[0].num_tokens == 8 and o[0].logprobs is None for o in out)
    # The same token ids HF generate produces for the same decoder inputs, one request at a time.
    for req, o in zip(reqs, out):
        batch = comp.build_decoder_inputs([req.memory], [req.prompt], prefixes=[req.prefix] if req.prefix else None)
        ids = comp.model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                  do_sample=False, max_new_tokens=8, pad_token_id=comp.tokenizer.pad_token_id)
        assert o[0].token_ids == ids[0].tolist()


def test_plain_text_requests_without_memory(setup):
    """memory=None: the decoder reads prefix + prompt as plain tokens (MemAgent's raw chunks, full context),
    batched with memory requests; greedy output equals HF generate from the token ids themselves."""
    comp, mems, reqs = setup
    prefix = "<|im_start|>user\n"
    plain = [GenerationRequest(None, PROMPTS[1]), GenerationRequest(None, PROMPTS[0], prefix=prefix)]
    out = HFEngine(comp).generate(plain + reqs[:1], SamplingOptions(temperature=0, max_new_tokens=6))
    for req, o in zip(plain, out):
        ids = torch.cat([comp.tokenize(req.prefix or []), comp.tokenize(req.prompt)])[None]
        ref = comp.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=6, pad_token_id=comp.tokenizer.pad_token_id)
        assert o[0].token_ids == ref[0, ids.shape[1]:].tolist()
    assert out[2][0].text == comp.generate(mems[:1], PROMPTS[:1], max_new_tokens=6)[0]  # the memory row unchanged


def test_n_samples_per_request_seeded(setup):
    comp, _, reqs = setup
    engine = HFEngine(comp)
    opts = SamplingOptions(n=3, temperature=1.0, max_new_tokens=6, seed=7)
    rng = torch.get_rng_state()
    a = engine.generate(reqs, opts)
    assert torch.equal(torch.get_rng_state(), rng)                   # a seeded call leaves the global RNG alone
    assert [len(x) for x in a] == [3, 3] and all(isinstance(r, GenerationResult) for x in a for r in x)
    seqs = [tuple(r.token_ids) for x in a for r in x]
    assert len(set(seqs)) == 6                                       # six different samples
    assert engine.generate(reqs, opts)[1][2].token_ids == a[1][2].token_ids            # reproducible
    assert engine.generate(reqs, SamplingOptions(n=3, max_new_tokens=6, seed=8))[0][0].token_ids != a[0][0].token_ids


def _ranks_and_nucleus(comp, req, r, temperature, top_p):
    """Per sampled token: its rank in the step's distribution (0 = most likely) and the size of the top-p
    nucleus of the tempered distribution (the fewest tokens whose mass reaches top_p)."""
    probs = torch.softmax(teacher_forced_logits(comp, req, r.token_ids) / temperature, dim=-1)
    order = probs.argsort(dim=-1, descending=True)
    ranks = (order == torch.tensor(r.token_ids)[:, None]).int().argmax(dim=-1)
    cum = probs.gather(1, order).cumsum(dim=-1)
    nucleus = (cum < top_p).sum(dim=-1) + 1
    return ranks, nucleus


def test_sampling_follows_the_options_exactly(setup):
    """top-p truncates to the nucleus; without it, the whole vocabulary is sampled (transformers' default top-k 50
    is off); the near-uniform random model makes both visible."""
    comp, _, reqs = setup
    engine = HFEngine(comp)
    full = engine.generate(reqs, SamplingOptions(n=4, max_new_tokens=8, seed=0))
    ranks = torch.cat([_ranks_and_nucleus(comp, q, r, 1.0, 1.0)[0] for q, x in zip(reqs, full) for r in x])
    assert ranks.max() >= 50, "no sample outside the top 50 in 64 draws from ~320 near-uniform tokens"
    nucleus_out = engine.generate(reqs, SamplingOptions(n=4, temperature=0.5, top_p=0.1, max_new_tokens=8, seed=0))
    for q, x in zip(reqs, nucleus_out):
        for r in x:
            ranks, nucleus = _ranks_and_nucleus(comp, q, r, 0.5, 0.1)
            assert (ranks < nucleus).all() and (nucleus < 100).all()


@pytest.mark.parametrize("temperature, top_p, max_batch_size", [(1.0, 1.0, None), (0.7, 0.9, 4), (0.0, 1.0, 1)])
def test_logprobs_equal_teacher_forced_policy(setup, temperature, top_p, max_batch_size):
    """Untempered log-probabilities whatever the sampling temperature / top-p, with left padding, rows that
    stop at different steps, and the batch split into several generate calls."""
    comp, mems, reqs = setup
    n = 1 if temperature == 0 else 3
    stops = list(range(40, 72))  # ~10 % of the vocabulary: rows end at different steps
    opts = SamplingOptions(n=n, temperature=temperature, top_p=top_p, max_new_tokens=12, stop_token_ids=stops,
                           seed=3, return_logprobs=True)
    out = HFEngine(comp, max_batch_size=max_batch_size).generate(reqs, opts)
    check_logprobs(comp, reqs, out)
    if temperature == 1.0:
        lengths = {r.num_tokens for x in out for r in x}
        assert len(lengths) > 1, "want rows of different lengths in one batch"


def test_samples_of_one_request_share_its_prefill(setup):
    """The n samples of a request are prefilled once (one forward over the unique prompts, its KV cache copied to
    every row) and sample exactly what n separate copies of the request, prefilled row by row, sample with the
    same seed: the same tokens, log-probabilities within 1e-5. Prefixes of different lengths: left padding."""
    comp, mems, _ = setup
    reqs = [GenerationRequest(mems[0], PROMPTS[0], prefix="<|im_start|>user\n"), GenerationRequest(mems[1], PROMPTS[1])]
    opts = SamplingOptions(n=3, temperature=0.8, max_new_tokens=9, seed=11, return_logprobs=True)
    batch_sizes = []
    hook = comp.model.register_forward_hook(
        lambda m, args, kwargs, out: batch_sizes.append(kwargs["inputs_embeds"].shape[:2])
        if kwargs.get("inputs_embeds") is not None else None, with_kwargs=True)
    try:
        shared = HFEngine(comp).generate(reqs, opts)
    finally:
        hook.remove()
    n_positions = comp.build_decoder_inputs(mems, PROMPTS, prefixes=["<|im_start|>user\n", ""]).inputs_embeds.shape[1]
    # The prefill: 2 rows (not 6) over all positions but the last; then generate's first step: 6 rows, 1 position.
    assert batch_sizes[:2] == [torch.Size([2, n_positions - 1]), torch.Size([6, 1])]
    check_logprobs(comp, reqs, shared)
    copies = [GenerationRequest(r.memory, r.prompt, prefix=r.prefix) for r in reqs for _ in range(3)]
    alone = HFEngine(comp).generate(copies, dataclasses.replace(opts, n=1))
    for k, per_request in enumerate(shared):
        for j, r in enumerate(per_request):
            a = alone[3 * k + j][0]
            assert r.token_ids == a.token_ids and r.finish_reason == a.finish_reason
            torch.testing.assert_close(r.logprobs, a.logprobs, rtol=0, atol=1e-5)


def test_max_new_tokens_and_finish_reasons(setup):
    comp, mems, reqs = setup
    engine = HFEngine(comp)
    greedy = engine.generate(reqs[:1], SamplingOptions(temperature=0, max_new_tokens=10))[0][0]
    assert greedy.finish_reason == "length" and greedy.num_tokens == 10
    # A stop token ends the response there: included in the ids (its probability is trained), not in the text.
    j = next(i for i in range(2, 10) if greedy.token_ids[i] not in greedy.token_ids[:i])
    stop = greedy.token_ids[j]
    r = engine.generate(reqs[:1], SamplingOptions(temperature=0, max_new_tokens=10, stop_token_ids=[stop],
                                                  return_logprobs=True))[0][0]
    assert r.token_ids == greedy.token_ids[: j + 1] and r.finish_reason == "stop"
    assert r.text == comp.tokenizer.decode(greedy.token_ids[:j], skip_special_tokens=True)
    assert r.logprobs.shape == (j + 1,)
    # Sampled rows: every response ends at its first stop token or at max_new_tokens, never in between.
    stops = set(range(40, 72))
    out = engine.generate(reqs, SamplingOptions(n=4, max_new_tokens=7, stop_token_ids=sorted(stops), seed=0))
    for x in out:
        for r in x:
            assert not stops & set(r.token_ids[:-1])
            if r.finish_reason == "stop":
                assert r.token_ids[-1] in stops and r.num_tokens <= 7
            else:
                assert r.finish_reason == "length" and r.num_tokens == 7
    assert {r.finish_reason for x in out for r in x} == {"stop", "length"}


def test_eos_always_stops(setup):
    comp, _, reqs = setup
    engine = HFEngine(comp)
    first = engine.generate(reqs[:1], SamplingOptions(temperature=0, max_new_tokens=3))[0][0].token_ids[0]
    eos = comp.tokenizer.eos_token_id
    head = comp.model.get_output_embeddings().weight
    with torch.no_grad():  # make EOS the greedy choice at step 0: its head row a scaled copy of the winner's
        head[eos] = 10 * head[first]
    r = engine.generate(reqs[:1], SamplingOptions(temperature=0, max_new_tokens=3, return_logprobs=True))[0][0]
    assert r.token_ids == [eos] and r.finish_reason == "stop" and r.text == ""
    check_logprobs(comp, reqs[:1], [[r]])


def test_models_own_generation_config_and_mode_are_left_alone(setup):
    comp, mems, reqs = setup
    opts = SamplingOptions(temperature=0, max_new_tokens=6)
    engine = HFEngine(comp)
    before = engine.generate(reqs, opts)
    gc = comp.model.generation_config
    gc.suppress_tokens = [before[0][0].token_ids[0]]    # what e.g. an Instruct checkpoint's defaults could hold
    for layer in comp.model.model.layers:                # dropout that would act in training mode
        layer.self_attn.attention_dropout = 0.5
    comp.model.train()
    after = engine.generate(reqs, opts)
    assert [x[0].token_ids for x in after] == [x[0].token_ids for x in before]
    sampled = engine.generate(reqs, SamplingOptions(n=2, max_new_tokens=6, seed=0, return_logprobs=True))
    comp.model.eval()
    check_logprobs(comp, reqs, sampled)                  # the policy's log-probabilities, without dropout
    comp.model.train()
    assert comp.generate(mems[:1], PROMPTS[:1], max_new_tokens=6)[0] != before[0][0].text  # HF would apply it
    assert comp.model.generation_config is gc and comp.model.training                   # restored
    assert not comp.model._forward_hooks                                                # hook removed


def test_bad_input_is_refused(setup, make_compressor):
    comp, mems, reqs = setup
    engine = HFEngine(comp)
    with pytest.raises(MemoryMismatchError, match=r"request 1: .*width is 48"):
        engine.generate([reqs[0], GenerationRequest(torch.zeros(3, 40), "Go")], SamplingOptions(max_new_tokens=2))
    other = make_compressor(seed=1)                      # a memory made by another compressor
    with pytest.raises(MemoryMismatchError, match="request 0: .*fingerprint"):
        engine.generate([GenerationRequest(other.encode(TEXTS[0]), "Go")], SamplingOptions(max_new_tokens=2))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate(reqs, SamplingOptions(max_new_tokens=2, stop_token_ids=[10**6]))
    with pytest.raises(ValueError, match="no requests"):
        engine.generate([], SamplingOptions())
    with pytest.raises(TypeError, match="list of GenerationRequest"):
        engine.generate(reqs[0], SamplingOptions())
    with pytest.raises(TypeError, match="request 1 is a tuple"):
        engine.generate([reqs[0], (mems[0], "Go")], SamplingOptions())
    with pytest.raises(TypeError, match="SamplingOptions"):
        engine.generate(reqs, {"n": 2})
    with pytest.raises(ValueError, match="max_batch_size"):
        HFEngine(comp, max_batch_size=0)
    for kwargs, err in [({"n": 0}, ValueError), ({"n": 2, "temperature": 0}, ValueError),
                        ({"temperature": 0, "top_p": 0.9}, ValueError), ({"temperature": -1}, ValueError),
                        ({"top_p": 0}, ValueError), ({"max_new_tokens": 0}, ValueError), ({"seed": -1}, ValueError),
                        ({"stop_token_ids": [-1]}, ValueError), ({"stop_token_ids": "ab"}, TypeError),
                        ({"return_logprobs": 1}, TypeError), ({"n": 1.0}, ValueError)]:
        with pytest.raises(err):
            SamplingOptions(**kwargs)
    with pytest.raises(ValueError, match=r"\[n_chunks, d\]"):
        GenerationRequest(torch.zeros(48), "Go")
    with pytest.raises(TypeError, match="floating point"):
        GenerationRequest(torch.zeros(2, 48, dtype=torch.long), "Go")
    with pytest.raises(TypeError, match="Memory, an"):
        GenerationRequest("text", "Go")
    with pytest.raises(TypeError, match="prompt"):
        GenerationRequest(mems[0], 3)
    with pytest.raises(TypeError):
        GenerationEngine()                               # abstract
