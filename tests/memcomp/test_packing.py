"""Task samples, the packing collator, the HF attention hook, the target-only loss, and the key invariant:
a packed forward equals running each sample alone through the unpacked forward."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from testutil import TEXTS, tiny_model

from memcomp import CompressorConfig, MemoryCompressor
from memcomp.attention import packed_attention_mode
from memcomp.fused import linear_cross_entropy, use_backend
from memcomp.packing import PackingCollator
from memcomp.tasks import INSTRUCTIONS, Sample, SampleBuilder


@pytest.fixture
def comp(base_tokenizer):
    tok = copy.deepcopy(base_tokenizer)
    return MemoryCompressor.from_base(tiny_model(tok, hidden=64, layers=2), tok, CompressorConfig(chunk_size=4))


# -- the collator on hand-built cases -------------------------------------------------------------------

def test_collator_exact_per_embedding():
    coll = PackingCollator(chunk_size=4, wrapper="per_embedding", mem_start_id=90, mem_end_id=91, pad_id=0,
                           max_tokens=64)
    a = Sample("qa", context=[1, 2, 3, 4, 5, 6], before=[100], after=[101, 102], target=[7, 8, 9])
    b = Sample("lm", context=[], before=[], after=[], target=[20, 21, 22])
    (batch,) = coll([b, a])
    assert batch.sample_index == [1, 0]                      # longest first
    assert batch.enc_input_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert batch.enc_position_ids.tolist() == [0, 1, 2, 3, 0, 1]
    assert batch.enc_cu_seqlens.tolist() == [0, 4, 6] and batch.enc_max_seqlen == 4
    a_ids = [100, 90, 0, 91, 90, 0, 91, 101, 102, 7, 8, 9]
    assert batch.dec_input_ids.tolist() == a_ids + [20, 21, 22]
    assert batch.dec_position_ids.tolist() == list(range(12)) + [0, 1, 2]
    assert batch.dec_cu_seqlens.tolist() == [0, 12, 15] and batch.dec_max_seqlen == 12
    assert batch.memory_slots.tolist() == [2, 5]
    assert batch.shift_labels.tolist() == [-100] * 8 + [7, 8, 9, -100] + [21, 22, -100]
    assert batch.target_rows.tolist() == [8, 9, 10, 12, 13] and batch.target_ids.tolist() == [7, 8, 9, 21, 22]
    assert batch.efficiency == 15 / 64


def test_collator_exact_per_block():
    coll = PackingCollator(chunk_size=4, wrapper="per_block", mem_start_id=90, mem_end_id=91, pad_id=0,
                           max_tokens=64)
    a = Sample("reconstruction", context=[1, 2, 3, 4, 5], before=[], after=[101], target=[7])
    (batch,) = coll([a])
    assert batch.dec_input_ids.tolist() == [90, 0, 0, 91, 101, 7]
    assert batch.memory_slots.tolist() == [1, 2]
    assert batch.enc_cu_seqlens.tolist() == [0, 4, 5]
    assert batch.shift_labels.tolist() == [-100, -100, -100, -100, 7, -100]


def test_first_fit_decreasing_and_errors():
    coll = PackingCollator(4, "per_block", 90, 91, 0, max_tokens=10)
    samples = [Sample("lm", [], [], [], list(range(n))) for n in (6, 5, 4, 3, 2)]
    batches = coll(samples)
    assert all(b.n_tokens <= 10 for b in batches)
    assert sorted(i for b in batches for i in b.sample_index) == list(range(5))
    assert [b.sample_index for b in batches] == [[0, 2], [1, 3, 4]]   # 6+4, 5+3+2: no row wasted
    assert PackingCollator.efficiency(batches) == 1.0
    with pytest.raises(ValueError, match="needs 11 decoder tokens, more than max_tokens=10"):
        coll([Sample("lm", [], [], [], list(range(11)))])
    with pytest.raises(ValueError, match="empty context"):
        coll([Sample("qa", [], [], [1], [2])])


# -- samples -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_bridge", [0, 1, 2, 3, 4])
def test_continuation_bridges(base_tokenizer, n_bridge):
    sb = SampleBuilder(base_tokenizer, "flat", chunk_size=4)
    doc = list(range(10, 110))
    s = sb.continuation(doc, random.Random(n_bridge), n_bridge=n_bridge)
    assert len(s.context) % 4 == 0 and s.meta["n_bridge"] == n_bridge
    bridge = s.after[len(s.after) - 4 * n_bridge:] if n_bridge else []
    assert s.context + bridge + s.target[:-1] == doc                   # nothing lost, nothing repeated
    assert s.target[-1] == base_tokenizer.eos_token_id
    with pytest.raises(ValueError, match="too short"):
        sb.continuation(list(range(12)), random.Random(0), n_bridge=4)


def test_prompt_formats(base_tokenizer):
    flat = SampleBuilder(base_tokenizer, "flat", chunk_size=4)
    chat = SampleBuilder(base_tokenizer, "chatml", chunk_size=4)
    rl = SampleBuilder(base_tokenizer, "chatml", boxed=True, chunk_size=4)
    doc, rng = list(range(10, 40)), random.Random(0)
    f = flat.reconstruction(doc, rng)
    decode = lambda ids: base_tokenizer.decode(ids)
    assert f.before == [] and decode(f.after).strip() in INSTRUCTIONS["reconstruction"]
    q = chat.qa(doc, "Who wrote it?", [5, 6])
    assert decode(q.before).startswith("<|im_start|>system\n") and decode(q.before).endswith("<|im_start|>user\n")
    assert "Who wrote it?" in decode(q.after) and decode(q.after).endswith("<|im_start|>assistant\n")
    assert decode(q.target).endswith("<|im_end|>")
    assert "\\boxed{}" in decode(rl.qa(doc, "Who?", [5]).after)
    assert "\\boxed{}" not in decode(q.after)
    with pytest.raises(ValueError, match="non-empty context"):
        chat.qa([], "Who?", [5])
    assert all(len(pool) >= 5 for pool in INSTRUCTIONS.values())


# -- HF attention hook -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hf_model_runs_its_layers_on_a_packed_row(comp, backend):
    m = comp.model
    a, b = torch.randint(0, 250, (7,)), torch.randint(0, 250, (12,))
    with torch.no_grad():
        ha, hb = (m.model(input_ids=t[None]).last_hidden_state[0] for t in (a, b))
        cu = torch.tensor([0, 7, 19], dtype=torch.int32)
        with packed_attention_mode(m), use_backend(backend):
            pos = torch.cat([torch.arange(7), torch.arange(12)])[None]
            h = m.model(input_ids=torch.cat([a, b])[None], position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                        max_length_q=12, max_length_k=12).last_hidden_state[0]
    torch.testing.assert_close(h[:7], ha, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h[7:], hb, rtol=1e-5, atol=1e-5)
    assert m.config._attn_implementation == "sdpa"            # restored
    with packed_attention_mode(m), pytest.raises(ValueError, match="cu_seq_lens_q"):
        m.model(input_ids=a[None])


# -- the loss ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_target_only_cross_entropy_equals_full_ce_on_targets(impl):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 24, generator=g, dtype=torch.float64)
    W = torch.randn(97, 24, generator=g, dtype=torch.float64)
    labels = torch.full((50,), -100)
    rows = torch.tensor([3, 4, 5, 20, 21, 49])
    labels[rows] = torch.randint(0, 97, (6,), generator=g)
    go = torch.rand(6, generator=g, dtype=torch.float64)
    h1, W1 = hidden.clone().requires_grad_(), W.clone().requires_grad_()
    full = F.cross_entropy(h1 @ W1.t(), labels, reduction="none", ignore_index=-100)[rows]
    g_full = torch.autograd.grad(full, (h1, W1), go)
    h2, W2 = hidden.float().requires_grad_(), W.float().requires_grad_()
    ours = linear_cross_entropy(h2[rows], W2, labels[rows], impl=impl, chunk_rows=4)
    g_ours = torch.autograd.grad(ours, (h2, W2), go.float())
    torch.testing.assert_close(ours.double(), full, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ours, g_full):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


# -- the key invariant --------------------------------------------------------------------------------------

def _samples(comp):
    sb = SampleBuilder(comp.tokenizer, "flat", chunk_size=4)
    rng = random.Random(0)
    docs = [comp.tokenize(t).tolist() for t in TEXTS]
    return [sb.reconstruction(docs[0][:23], rng), sb.continuation(docs[1], rng, n_bridge=1),
            sb.lm(docs[2][:20]), sb.qa(docs[2][:9], "What is it?", docs[0][:5]),
            sb.continuation(docs[0], rng, n_bridge=0)]


def _unpacked_losses(comp, s):
    if s.task == "lm":
        ids = torch.tensor(s.target)[None]
        logits = comp.model(input_ids=ids).logits[0, :-1]
        return F.cross_entropy(logits, ids[0, 1:], reduction="none")
    return comp(instructions=[s.after], targets=[s.target[:-1]], contexts=[s.context]).token_losses


INVARIANT_CASES = [("qwen2", "per_embedding", "reference"), ("qwen2", "per_embedding", "triton"),
                   ("qwen2", "per_block", "reference"), ("qwen2", "per_block", "triton"),
                   ("llama", "per_embedding", "triton"), ("mistral", "per_embedding", "triton"),
                   ("mistral-window-fits", "per_block", "triton")]


@pytest.mark.parametrize("family,wrapper,backend", INVARIANT_CASES)
def test_packed_forward_equals_unpacked_losses_and_gradients(base_tokenizer, family, wrapper, backend):
    tok = copy.deepcopy(base_tokenizer)
    model = tiny_model(tok, family=family.split("-")[0], hidden=64, layers=2)
    comp = MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=4, wrapper=wrapper))
    if family == "mistral-window-fits":  # a sliding window no packed segment exceeds changes nothing: exact
        (batch,) = PackingCollator.from_compressor(comp, max_tokens=1024)(_samples(comp))
        model.config.sliding_window = batch.dec_max_seqlen
    with torch.no_grad():
        comp.projection.weight.add_(0.05 * torch.randn_like(comp.projection.weight))
    samples = _samples(comp)
    (batch,) = PackingCollator.from_compressor(comp, max_tokens=1024)(samples)
    assert len(batch.sample_index) == len(samples)
    params = [p for p in comp.parameters() if p.requires_grad]

    with use_backend(backend):
        out = comp.forward_packed(batch)
    g_packed = torch.autograd.grad(out.token_losses.sum(), params, allow_unused=True)

    ref = [_unpacked_losses(comp, samples[i]) for i in batch.sample_index]
    ref_losses = torch.cat(ref)
    g_ref = torch.autograd.grad(ref_losses.sum(), params, allow_unused=True)

    assert out.num_target_tokens == ref_losses.numel()
    torch.testing.assert_close(out.token_losses, ref_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_packed, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    proj = next(i for i, p in enumerate(params) if p is comp.projection.weight)
    assert g_packed[proj].abs().sum() > 0, "no gradient reached the projection through the packed path"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_activation_checkpointing_keeps_packed_gradients(base_tokenizer, backend):
    """Layers recomputed in backward replay in packed mode: the same losses and gradients as without
    checkpointing. Hugging Face's own checkpointing replays outside it (wrong gradients) and is refused."""
    from memcomp.attention import _REPLAYS_PACKED, _layers

    tok = copy.deepcopy(base_tokenizer)
    comp = MemoryCompressor.from_base(tiny_model(tok, hidden=64, layers=2), tok, CompressorConfig(chunk_size=4))
    comp.train()
    (batch,) = PackingCollator.from_compressor(comp, max_tokens=1024)(_samples(comp))
    params = [p for p in comp.parameters() if p.requires_grad]
    calls = []
    comp.model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))

    def run():
        calls.clear()
        with use_backend(backend):
            out = comp.forward_packed(batch)
        grads = torch.autograd.grad(out.loss, params, allow_unused=True)
        return out.token_losses.detach(), grads, len(calls)

    ref_losses, ref, n_plain = run()
    assert comp.enable_activation_checkpointing() == 2
    losses, got, n_ckpt = run()
    assert n_ckpt == 2 * n_plain, "the layers were not recomputed"
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=0)
    for a, b in zip(got, ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # A deep copy (an EMA or teacher model) replays under its own config, not the original's.
    clone = copy.deepcopy(comp)
    with use_backend(backend):
        out = clone.forward_packed(batch)
    cloned = torch.autograd.grad(out.loss, [p for p in clone.parameters() if p.requires_grad], allow_unused=True)
    for a, b in zip(cloned, ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    comp.disable_activation_checkpointing()
    if hasattr(comp.model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        comp.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        comp.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="enable_activation_checkpointing"):
        comp.forward_packed(batch)
    # What the check prevents: let Hugging Face's replay through. It runs the model's own attention over the
    # whole row, which saves other tensors than the packed forward did; torch notices only in backward.
    for layer in _layers(comp.model):
        setattr(layer._gradient_checkpointing_func, _REPLAYS_PACKED, True)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        run()


def test_chatml_rows_are_isolated(comp):
    """Packing several ChatML samples together gives each the losses it gets alone."""
    sb = SampleBuilder(comp.tokenizer, "chatml", boxed=True, chunk_size=4)
    docs = [comp.tokenize(t).tolist() for t in TEXTS]
    samples = [sb.qa(docs[i][:13 + 3 * i], f"Question {i}?", docs[(i + 1) % 3][:6]) for i in range(3)]
    coll = PackingCollator.from_compressor(comp, max_tokens=1024)
    (together,) = coll(samples)
    with torch.no_grad():
        packed = comp.forward_packed(together).token_losses
        alone = torch.cat([comp.forward_packed(coll([samples[i]])[0]).token_losses for i in together.sample_index])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


# -- attention features the packed kernel does not implement are refused, never ignored -------------------------

def test_sliding_window_shorter_than_a_segment_is_refused(base_tokenizer):
    """The failing input: a tiny Mistral with sliding_window=6 and a QA sample whose decoder segment is longer:
    packed losses differed from the sample run alone by up to 0.18, silently."""
    tok = copy.deepcopy(base_tokenizer)
    model = tiny_model(tok, family="mistral", hidden=64, layers=2)
    model.config.sliding_window = 6
    comp = MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=4))
    docs = [comp.tokenize(t).tolist() for t in TEXTS]
    sample = SampleBuilder(comp.tokenizer, "flat", chunk_size=4).qa(docs[2][:9], "What is it?", docs[0][:5])
    (batch,) = PackingCollator.from_compressor(comp, max_tokens=1024)([sample])
    assert batch.dec_max_seqlen > 6
    with pytest.raises(NotImplementedError, match="sliding_window=6"):
        comp.forward_packed(batch)


@pytest.mark.parametrize("feature", ["softcap", "s_aux", "dropout"])
def test_unimplemented_attention_features_are_refused(comp, feature):
    from memcomp.attention import _memcomp_packed_attention

    attn = comp.model.model.layers[0].self_attn.train()
    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    kwargs = {"dropout": 0.1} if feature == "dropout" else {feature: 0.5}
    with pytest.raises(NotImplementedError, match="dropout" if feature == "dropout" else feature):
        _memcomp_packed_attention(attn, q, k, k, None, cu_seq_lens_q=cu, max_length_q=6, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_non_default_scaling_and_bidirectional_modules(comp, backend):
    """The model's own softmax scale reaches the kernel, and a module with is_causal = False attends both ways."""
    m = comp.model
    for layer in m.model.layers:
        layer.self_attn.scaling = 0.37
    a, b = torch.randint(0, 250, (5,)), torch.randint(0, 250, (9,))
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)
    pos = torch.cat([torch.arange(5), torch.arange(9)])[None]
    with torch.no_grad():
        alone = [m.model(input_ids=t[None]).last_hidden_state[0] for t in (a, b)]
        with packed_attention_mode(m), use_backend(backend):
            h = m.model(input_ids=torch.cat([a, b])[None], position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                        max_length_q=9, max_length_k=9).last_hidden_state[0]
    torch.testing.assert_close(h[:5], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h[5:], alone[1], rtol=1e-5, atol=1e-5)

    from memcomp.kernels.packed_attention import packed_attention_reference

    from memcomp.attention import _memcomp_packed_attention

    attn = m.model.layers[0].self_attn
    attn.is_causal = False
    q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with use_backend(backend):
        out, _ = _memcomp_packed_attention(attn, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, max_length_q=6)
    ref = packed_attention_reference(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, False, 0.25)
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)


def test_collator_refuses_token_ids_outside_the_vocabulary(comp):
    """The training step skips the loss op's device-side target check: the collator checks on the host."""
    vocab = comp.model.get_input_embeddings().weight.shape[0]
    sb = SampleBuilder(comp.tokenizer, "flat", chunk_size=4)
    collate = PackingCollator.from_compressor(comp, max_tokens=256)
    with pytest.raises(ValueError, match=rf"target token ids must lie in \[0, {vocab}\)"):
        collate([sb.qa([5, 6, 7], "What?", [vocab + 3])])
    with pytest.raises(ValueError, match=r"context token ids must lie in"):
        collate([sb.qa([5, -1, 7], "What?", [5])])


def test_public_task_prompt_is_what_training_uses(comp):
    sb = SampleBuilder(comp.tokenizer, "chatml", chunk_size=4)
    before, after = sb.prompt(INSTRUCTIONS["reconstruction"][0])
    sample = sb._sample("reconstruction", [5, 6], INSTRUCTIONS["reconstruction"][0], [7])
    assert (sample.before, sample.after) == (before, after) and before
    with pytest.raises(ValueError, match="non-empty"):
        sb.prompt("")


def test_samples_refuse_text_where_token_ids_belong(comp):
    """A newcomer's input: a str document (list() split it into characters, and the collator failed much later
    with "'<' not supported between instances of 'str' and 'int'"), a str answer, an int as the rng."""
    sb = SampleBuilder(comp.tokenizer, "flat", chunk_size=4)
    with pytest.raises(TypeError, match="got a str; tokenize it first"):
        sb.reconstruction("def foo(): pass", random.Random(0))
    with pytest.raises(TypeError, match="target must be token ids"):
        sb.qa([5, 6, 7], "Who?", "foo")
    with pytest.raises(TypeError, match=r"rng must be a random.Random"):
        sb.reconstruction([5, 6, 7], 0)
    with pytest.raises(TypeError, match="got float"):
        sb.lm([5, 6.5])
    sample = sb.qa(torch.tensor([5, 6, 7]), "Who?", torch.tensor([8]))  # 1-D integer tensors are token ids too
    assert sample.context == [5, 6, 7] and sample.target[0] == 8
