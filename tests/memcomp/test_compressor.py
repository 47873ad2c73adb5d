"""MemoryCompressor: encode, decoder inputs, loss, generate, persistence, errors."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from testutil import TEXTS, tiny_model

from memcomp import CompressorConfig, Memory, MemoryCompressor, MemoryMismatchError
from memcomp.fused import use_backend


def naive_encode(comp, ids):
    """What the paper describes, the slow way: each chunk alone through the HF model (final norm
    included), mean of its final hidden states over real tokens, then the projection."""
    C = comp.config.chunk_size
    out = []
    with torch.no_grad():
        for s in range(0, ids.numel(), C):
            h = comp.model.model(input_ids=ids[None, s:s + C]).last_hidden_state[0]
            out.append(comp.projection(h.mean(0)))
    return torch.stack(out)


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_encode_equals_naive_per_chunk_loop(make_compressor, family, backend):
    comp = make_compressor(family=family, chunks_per_batch=3)
    ids = [comp.tokenize(t) for t in TEXTS]
    assert all(t.numel() % 4 for t in ids[:2]), "want partial last chunks"
    with use_backend(backend):
        mems = comp.encode(TEXTS)
    for mem, t in zip(mems, ids):
        assert mem.num_tokens == t.numel() and mem.n_chunks == -(-t.numel() // 4)
        assert mem.fingerprint == comp.fingerprint()
        torch.testing.assert_close(mem.embeddings, naive_encode(comp, t), rtol=1e-4, atol=1e-5)


def test_encode_accepts_str_ids_and_lists(make_compressor):
    comp = make_compressor()
    ids = comp.tokenize(TEXTS[0])
    a = comp.encode(TEXTS[0])
    b = comp.encode(ids)
    c = comp.encode(ids.tolist())
    assert isinstance(a, Memory) and isinstance(c, Memory)
    torch.testing.assert_close(a.embeddings, b.embeddings)
    torch.testing.assert_close(a.embeddings, c.embeddings)
    many = comp.encode(TEXTS[:2])
    assert isinstance(many, list) and len(many) == 2
    torch.testing.assert_close(many[0].embeddings, a.embeddings)


def test_empty_text_gives_an_empty_memory_the_decoder_accepts(make_compressor, wrapper="per_block"):
    comp = make_compressor(wrapper=wrapper)
    mem = comp.encode("")
    assert mem.n_chunks == 0 and mem.num_tokens == 0 and mem.embeddings.shape == (0, comp.hidden_size)
    mems = comp.encode(["", TEXTS[0]])
    assert mems[0].n_chunks == 0 and mems[1].n_chunks > 0
    batch = comp.build_decoder_inputs(mems, ["Go", "Go"], padding_side="right")
    assert batch.memory_positions[0].numel() == 0
    assert isinstance(comp.generate(mem, "Go", max_new_tokens=2)[0], str)


def test_encoder_skips_lm_head_and_restores_final_norm(make_compressor):
    comp = make_compressor()
    calls = {"lm_head": 0, "norm": 0}
    comp.model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1))
    norm = comp.model.model.norm
    norm.register_forward_hook(lambda *a: calls.__setitem__("norm", calls["norm"] + 1))
    comp.encode(TEXTS[0])
    assert calls == {"lm_head": 0, "norm": 0}, "encoder ran the LM head or the model's own final norm"
    assert comp.model.model.norm is norm
    # Restored even when the encoder fails half-way.
    def fail(*args, **kwargs):
        raise RuntimeError("layer failed")

    comp.model.model.layers[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="layer failed"):
        comp.encode(TEXTS[0])
    assert comp.model.model.norm is norm


def test_micro_batching_bounds_the_batch_and_matches(make_compressor):
    comp = make_compressor(chunks_per_batch=2)
    seen = []
    comp.model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(o[0].shape[0] if isinstance(o, tuple)
                                                                                 else o.shape[0]))
    long_text = " ".join(TEXTS)
    small = comp.encode(long_text)
    assert max(seen) <= 2
    big = comp.encode(long_text, chunks_per_batch=64)
    torch.testing.assert_close(small.embeddings, big.embeddings, rtol=1e-5, atol=1e-6)


def test_encode_gradients_flow_to_encoder_and_projection(make_compressor):
    comp = make_compressor()
    comp.train()
    out = comp(["Reconstruct:"], [TEXTS[0]], contexts=[TEXTS[0]])
    out.loss.backward()
    assert comp.projection.weight.grad.abs().sum() > 0
    assert comp.model.model.norm.weight.grad.abs().sum() > 0, "final norm gets gradient via the fused op"
    assert comp.model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("wrapper", ["per_embedding", "per_block"])
def test_decoder_inputs_layout(make_compressor, wrapper):
    comp = make_compressor(wrapper=wrapper)
    mems = comp.encode([TEXTS[0], TEXTS[1]])
    inst = ["Reconstruct the text:", "Go"]
    batch = comp.build_decoder_inputs(mems, inst, padding_side="left")
    S, E = comp.mem_start_id, comp.mem_end_id
    emb = comp.model.get_input_embeddings()
    B, L, d = batch.inputs_embeds.shape
    assert B == 2 and d == comp.hidden_size
    for b, (mem, text) in enumerate(zip(mems, inst)):
        n = mem.n_chunks
        inst_ids = comp.tokenize(text)
        block = 3 * n if wrapper == "per_embedding" else n + 2
        row_len = block + inst_ids.numel()
        off = L - row_len
        assert batch.attention_mask[b].tolist() == [0] * off + [1] * row_len
        assert batch.position_ids[b, off:].tolist() == list(range(row_len))
        if wrapper == "per_embedding":
            expected_slots = [off + 3 * i + 1 for i in range(n)]
            starts, ends = [off + 3 * i for i in range(n)], [off + 3 * i + 2 for i in range(n)]
        else:
            expected_slots = [off + 1 + i for i in range(n)]
            starts, ends = [off], [off + n + 1]
        assert batch.memory_positions[b].tolist() == expected_slots
        torch.testing.assert_close(batch.inputs_embeds[b, expected_slots], mem.embeddings)
        for p in starts:
            torch.testing.assert_close(batch.inputs_embeds[b, p], emb.weight[S])
        for p in ends:
            torch.testing.assert_close(batch.inputs_embeds[b, p], emb.weight[E])
        torch.testing.assert_close(batch.inputs_embeds[b, off + block:], emb(inst_ids))
    assert batch.labels is None
    assert batch.padded
    same = comp.build_decoder_inputs([mems[0], mems[0]], [inst[0], inst[0]])
    assert not same.padded and bool(same.attention_mask.all())


def test_prefix_before_the_memory_block(make_compressor):
    """ChatML prompts put system/user headers before the memory: slots shift, the prefix is embedded as is."""
    comp = make_compressor(wrapper="per_block")
    mem = comp.encode(TEXTS[0])
    prefix = comp.tokenize("System header. User:")
    batch = comp.build_decoder_inputs([mem], ["Go"], prefixes=[prefix], padding_side="right")
    n = mem.n_chunks
    assert batch.memory_positions[0].tolist() == [len(prefix) + 1 + i for i in range(n)]
    emb = comp.model.get_input_embeddings()
    torch.testing.assert_close(batch.inputs_embeds[0, : len(prefix)], emb(prefix))
    torch.testing.assert_close(batch.inputs_embeds[0, batch.memory_positions[0]], mem.embeddings)
    assert isinstance(comp.generate(mem, "Go", prefixes=[prefix], max_new_tokens=2)[0], str)
    with pytest.raises(ValueError, match="prefixes"):
        comp.build_decoder_inputs([mem], ["Go"], prefixes=[prefix, prefix])


def test_training_labels_and_loss_match_full_logits(make_compressor):
    comp = make_compressor()
    targets = [TEXTS[2], TEXTS[0][:40]]
    mems = comp.encode(targets)
    out = comp(["Reconstruct:", "Again:"], targets, memories=mems)
    batch = comp.build_decoder_inputs(mems, ["Reconstruct:", "Again:"], targets, padding_side="right")
    eos = comp.tokenizer.eos_token_id
    for b, t in enumerate(targets):
        lab = batch.labels[b][batch.labels[b] != -100].tolist()
        assert lab == comp.tokenize(t).tolist() + [eos]
    with torch.no_grad():
        logits = comp.model(**batch.model_kwargs()).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                           ignore_index=-100)
    torch.testing.assert_close(out.loss, full, rtol=1e-5, atol=1e-6)
    assert out.num_target_tokens == int((batch.labels != -100).sum()) == out.token_losses.numel()


def test_generate_batched_equals_one_by_one(make_compressor):
    comp = make_compressor()
    mems = comp.encode(TEXTS)
    prompts = ["Reconstruct:", "Write it out again please:", "Go"]
    batched = comp.generate(mems, prompts, max_new_tokens=8)
    singles = [comp.generate(m, p, max_new_tokens=8)[0] for m, p in zip(mems, prompts)]
    assert batched == singles
    assert all(isinstance(s, str) for s in batched)


def test_save_pretrained_round_trip(make_compressor, tmp_path):
    comp = make_compressor(wrapper="per_block", chunk_size=8)
    mem = comp.encode(TEXTS[1])
    comp.save_pretrained(tmp_path)
    loaded = MemoryCompressor.from_pretrained(tmp_path)
    assert loaded.config == comp.config
    assert loaded.mem_start_id == comp.mem_start_id and loaded.mem_end_id == comp.mem_end_id
    assert loaded.fingerprint() == comp.fingerprint()
    torch.testing.assert_close(loaded.encode(TEXTS[1]).embeddings, mem.embeddings)
    loaded.check_memory(mem)
    assert loaded.generate(mem, "Go", max_new_tokens=5) == comp.generate(mem, "Go", max_new_tokens=5)


def test_memory_save_load_and_mismatch_errors(make_compressor, tmp_path):
    comp = make_compressor()
    mem = comp.encode(TEXTS[0])
    path = tmp_path / "m.safetensors"
    mem.save(path)
    back = Memory.load(path)
    torch.testing.assert_close(back.embeddings, mem.embeddings)
    assert (back.num_tokens, back.chunk_size, back.fingerprint) == (mem.num_tokens, 4, mem.fingerprint)
    comp.generate(back, "Go", max_new_tokens=2)

    other = make_compressor(seed=1)
    with pytest.raises(MemoryMismatchError, match="fingerprint"):
        other.generate(back, "Go", max_new_tokens=2)
    wider = Memory(torch.zeros(mem.n_chunks, comp.hidden_size + 1), mem.num_tokens, 4, mem.fingerprint)
    with pytest.raises(MemoryMismatchError, match="hidden size"):
        comp.build_decoder_inputs([wider], ["Go"])
    other_chunk = Memory(torch.zeros(1, comp.hidden_size), 8, 8, mem.fingerprint)
    with pytest.raises(MemoryMismatchError, match="chunk_size"):
        comp.build_decoder_inputs([other_chunk], ["Go"])
    # The wrapper is a decoder-side choice: the same memory reads with either layout.
    other_layout = MemoryCompressor(comp.model, comp.tokenizer, CompressorConfig(chunk_size=4, wrapper="per_block"),
                                    comp.projection)
    other_layout.check_memory(mem)
    # Training the compressor changes its fingerprint: old memories are refused.
    with torch.no_grad():
        comp.projection.weight.mul_(1.5)
    with pytest.raises(MemoryMismatchError, match="re-encode"):
        comp.check_memory(mem)


def test_corrupt_and_foreign_memory_files(tmp_path):
    from safetensors.torch import save_file

    from memcomp.memory import MemoryFileError

    mem = Memory(torch.randn(3, 8), 10, 4, "abc")
    good = tmp_path / "good.safetensors"
    mem.save(good)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MemoryFileError, match="truncated or corrupt"):
        Memory.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(MemoryFileError, match="truncated or corrupt"):
        Memory.load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(MemoryFileError, match="not a memcomp memory"):
        Memory.load(tmp_path / "foreign.safetensors")
    with pytest.raises(MemoryFileError, match="not found"):
        Memory.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="needs 3 embeddings"):
        Memory(torch.zeros(2, 8), 10, 4, "abc")


def test_from_pretrained_errors(make_compressor, tmp_path, base_tokenizer):
    with pytest.raises(FileNotFoundError, match="memcomp_config.json missing"):
        MemoryCompressor.from_pretrained(tmp_path)
    comp = make_compressor()
    comp.save_pretrained(tmp_path / "c")
    # A tokenizer without the special tokens (a plain model directory with a copied config).
    base_tokenizer.save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="lacks the compressor's special tokens"):
        MemoryCompressor.from_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "memcomp_config.json").read_text())
    cfg["config"]["bogus"] = 1
    (tmp_path / "c" / "memcomp_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown CompressorConfig keys: bogus"):
        MemoryCompressor.from_pretrained(tmp_path / "c")
    assert os.path.exists(tmp_path / "c" / "memcomp_projection.safetensors")


def test_from_base_rejects_unsupported_architectures(base_tokenizer):
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(base_tokenizer), n_embd=32,
                                                               n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="Qwen2 / Llama / Mistral"):
        MemoryCompressor.from_base(gpt2, base_tokenizer)


def test_from_base_adds_tokens_and_resizes(base_tokenizer):
    import copy

    tok = copy.deepcopy(base_tokenizer)
    model = tiny_model(tok)
    n = model.get_input_embeddings().weight.shape[0]
    comp = MemoryCompressor.from_base(model, tok)
    assert comp.model.get_input_embeddings().weight.shape[0] == n + 2 == len(tok)
    assert tok.convert_tokens_to_ids("<MEM_START>") == comp.mem_start_id != comp.mem_end_id
    from memcomp.projection import embedding_scale  # default scaled_normal: N(0, s^2 / d)

    std = float(comp.projection.weight.std()) * comp.hidden_size ** 0.5
    assert std == pytest.approx(embedding_scale(comp.model), rel=0.1)


@pytest.mark.parametrize("kwargs,msg", [
    ({"chunk_size": 0}, "chunk_size"), ({"wrapper": "nested"}, "wrapper"),
    ({"projection_init": "xavier"}, "projection_init"), ({"chunks_per_batch": 0}, "chunks_per_batch"),
    ({"mem_start_token": "<M>", "mem_end_token": "<M>"}, "distinct"),
])
def test_config_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        CompressorConfig(**kwargs)


def test_config_is_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        CompressorConfig().chunk_size = 4


@pytest.mark.gpu
def test_gpu_encode_bf16_matches_naive(base_tokenizer):
    import copy

    tok = copy.deepcopy(base_tokenizer)
    model = tiny_model(tok, hidden=256).to("cuda", torch.bfloat16)
    comp = MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=16))
    text = " ".join(TEXTS * 3)
    mem = comp.encode(text)
    ref = naive_encode(comp, comp.tokenize(text).cuda())
    rel = (mem.embeddings.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 2e-2
    # NVTX ranges (encode, pool, generate, prefill) on a real device: balanced and harmless.
    assert len(comp.generate(mem, "Go", max_new_tokens=3)) == 1


# --------------------------------------------------------------------------------------------------
# generate: memcomp's defaults never override what the caller decided
# --------------------------------------------------------------------------------------------------

def _generate_ids(comp, mem, **kwargs):
    """The token ids generate would decode (HF generate with memcomp's merged options)."""
    from memcomp.compressor import _check_room, generation_kwargs

    batch = comp.build_decoder_inputs([mem], ["Go"], padding_side="left")
    kwargs = generation_kwargs(kwargs, pad_token_id=comp.tokenizer.pad_token_id)
    _check_room(kwargs, batch.inputs_embeds.shape[1])
    out = comp.model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, **kwargs)
    return out[0], batch.inputs_embeds.shape[1]


def test_generate_obeys_the_callers_length(make_compressor):
    from transformers import GenerationConfig

    comp = make_compressor()
    mem = comp.encode(TEXTS[0])
    _, prompt = _generate_ids(comp, mem, max_new_tokens=1)
    # The failing input: max_length=5 with no EOS came back with 64 new tokens (memcomp's default won). The
    # caller's max_length now reaches transformers, which counts the prompt positions in it; a max_length
    # that leaves no room is refused with the count, not answered with 64 tokens.
    with pytest.raises(ValueError, match=f"already takes {prompt} positions"):
        comp.generate(mem, "Go", max_length=5, eos_token_id=None)
    ids, _ = _generate_ids(comp, mem, max_length=prompt + 5, eos_token_id=None)
    assert ids.numel() == 5
    gc = GenerationConfig(max_length=prompt + 3, eos_token_id=None)
    assert _generate_ids(comp, mem, generation_config=gc)[0].numel() == 3
    gc = GenerationConfig(max_new_tokens=4, eos_token_id=None)
    assert _generate_ids(comp, mem, generation_config=gc)[0].numel() == 4
    assert _generate_ids(comp, mem, eos_token_id=None)[0].numel() == 64  # nothing decided: memcomp's default
    text = comp.generate(mem, "Go", max_length=prompt + 5, eos_token_id=None)[0]
    assert text == comp.tokenizer.decode(ids, skip_special_tokens=True)


def test_generate_defaults_fill_only_what_the_caller_left_open():
    from transformers import GenerationConfig

    from memcomp.compressor import generation_kwargs

    assert generation_kwargs({}, pad_token_id=7) == {"max_new_tokens": 64, "do_sample": False, "pad_token_id": 7}
    assert generation_kwargs({"max_length": 5}, pad_token_id=7) == {"max_length": 5, "do_sample": False,
                                                                    "pad_token_id": 7}
    cfg = GenerationConfig(do_sample=True, temperature=0.7, max_new_tokens=9, pad_token_id=3)
    assert generation_kwargs({"generation_config": cfg}, pad_token_id=7) == {"generation_config": cfg}
    assert generation_kwargs({"do_sample": True, "top_p": 0.9}, pad_token_id=7)["do_sample"] is True
    with pytest.raises(ValueError, match="temperature set without do_sample"):
        generation_kwargs({"temperature": 0.7}, pad_token_id=7)
    with pytest.raises(ValueError, match="top_k set without do_sample"):
        generation_kwargs({"generation_config": GenerationConfig(top_k=5)}, pad_token_id=7)


# --------------------------------------------------------------------------------------------------
# Fingerprint: any change to a tensor the encoder reads invalidates old memories
# --------------------------------------------------------------------------------------------------

def test_sparse_embedding_update_invalidates_the_memory(base_tokenizer):
    """The failing input: embedding matrix padded to 4,096 rows, one AdamW step that changes only the rows of
    the text's tokens; the memory moved by ~0.17 and the old one was still accepted."""
    import copy

    tok = copy.deepcopy(base_tokenizer)
    comp = MemoryCompressor.from_base(tiny_model(tok), tok, CompressorConfig(chunk_size=4))
    comp.model.resize_token_embeddings(4096)
    mem = comp.encode(TEXTS[0])
    ids = comp.tokenize(TEXTS[0])
    emb = comp.model.get_input_embeddings().weight
    opt = torch.optim.AdamW([emb], lr=1e-2)
    emb.grad = torch.zeros_like(emb)
    emb.grad[ids.unique()] = torch.randn(ids.unique().numel(), emb.shape[1])
    before = emb.detach().clone()
    opt.step()
    changed = (emb.detach() != before).any(1)
    # AdamW's weight decay touches every row; undo it outside the text's rows so only those rows change.
    with torch.no_grad():
        emb[~torch.isin(torch.arange(emb.shape[0]), ids)] = before[~torch.isin(torch.arange(emb.shape[0]), ids)]
    changed = (emb.detach() != before).any(1)
    assert changed.sum() == ids.unique().numel() and changed.sum() < 0.05 * emb.shape[0]
    moved = (comp.encode(TEXTS[0]).embeddings - mem.embeddings).abs().max()
    assert moved > 1e-3, "the update should move the memory"
    with pytest.raises(MemoryMismatchError, match="re-encode"):
        comp.check_memory(mem)


@pytest.mark.parametrize("where", ["one_element_of_a_layer", "final_norm", "projection_bias", "nf4_buffer",
                                   "swap_two_elements"])
def test_fingerprint_sees_every_encoder_tensor(make_compressor, where):
    from memcomp.fqlora import FQLoRAConfig, apply_fqlora

    comp = make_compressor()
    if where == "nf4_buffer":
        apply_fqlora(comp, FQLoRAConfig(rank=2, full_ft_layers=(0,)))
    fp = comp.fingerprint()
    with torch.no_grad():
        if where == "one_element_of_a_layer":
            w = comp.model.model.layers[1].mlp.down_proj.weight
            w.view(-1)[w.numel() // 2 + 1] += 1e-3
        elif where == "final_norm":
            comp.model.model.norm.weight[3] += 1e-3
        elif where == "projection_bias":
            comp.projection.bias[-1] += 1e-3
        elif where == "nf4_buffer":
            comp.model.model.layers[1].self_attn.q_proj.nf4_packed[5] ^= 1
        else:
            w = comp.model.model.layers[0].self_attn.v_proj.weight.view(-1)
            w[[1, 2]] = w[[2, 1]].clone()
    assert comp.fingerprint() != fp


def test_fingerprint_ignores_the_lm_head_and_survives_save_load(make_compressor, tmp_path):
    comp = make_compressor()
    fp = comp.fingerprint()
    assert comp.fingerprint() == fp  # cached, and deterministic
    if not comp.model.config.tie_word_embeddings:
        with torch.no_grad():
            comp.model.lm_head.weight[0, 0] += 1.0  # the encoder never reads the LM head
        assert comp.fingerprint() == fp
    comp.save_pretrained(tmp_path)
    assert MemoryCompressor.from_pretrained(tmp_path).fingerprint() == comp.fingerprint()
    with torch.no_grad():  # a new storage with the same values keeps the fingerprint; other values change it
        comp.projection.weight.data = comp.projection.weight.data.clone()
    assert comp.fingerprint() == fp
    comp.projection.weight.data = comp.projection.weight.data * 2
    assert comp.fingerprint() != fp


# --------------------------------------------------------------------------------------------------
# One rule for token ids across the API
# --------------------------------------------------------------------------------------------------

def test_generate_takes_a_prompt_as_token_ids(make_compressor):
    """The failing input: generate(mem, ids) with the prompt as a list of ints or a 1-D tensor failed with
    "1 memories, 14 instructions"; encode took the same list as one text."""
    comp = make_compressor()
    mem = comp.encode(TEXTS[0])
    ids = comp.tokenize("\nQuestion: what is it?\nAnswer:")
    want = comp.generate(mem, "\nQuestion: what is it?\nAnswer:", max_new_tokens=3)
    assert comp.generate(mem, ids.tolist(), max_new_tokens=3) == want
    assert comp.generate(mem, ids, max_new_tokens=3) == want
    assert comp.generate([mem, mem], ids, max_new_tokens=3) == want * 2  # one prompt for every memory
    assert comp.generate([mem, mem], [ids, ids.tolist()], max_new_tokens=3) == want * 2


def test_bad_token_ids_are_refused_clearly(make_compressor, base_tokenizer):
    comp = make_compressor()
    vocab = comp.model.get_input_embeddings().weight.shape[0]
    with pytest.raises(TypeError, match="must be integers, got a torch.float32"):
        comp.encode(torch.tensor([1.5, 2.7]))             # was truncated to [1, 2] silently
    with pytest.raises(TypeError, match="must be ints, got float"):
        comp.tokenize([1, 2.5])
    with pytest.raises(ValueError, match=r"input_ids\[0\]"):
        comp.encode(torch.tensor([[5, 6, 7]]))            # a tokenizer's [1, T]: was a list of one memory
    with pytest.raises(ValueError, match=rf"\[0, {vocab}\)"):
        comp.encode([5, vocab])                            # was torch's bare IndexError from the embedding
    with pytest.raises(ValueError, match=rf"\[0, {vocab}\)"):
        comp.generate(comp.encode(TEXTS[0]), [-1, 5], max_new_tokens=1)
    with pytest.raises(TypeError, match=r"expected a text \(str, list of ints, 1-D integer tensor\)"):
        comp.encode(3.0)
    many = comp.encode([torch.tensor([5, 6, 7]), [8, 9]])
    assert [m.num_tokens for m in many] == [3, 2]


def test_memory_refuses_integer_embeddings_and_names_device_errors(tmp_path):
    with pytest.raises(TypeError, match="floating point"):
        Memory(torch.zeros(1, 8, dtype=torch.long), 4, 4, "fp")
    mem = Memory(torch.randn(2, 8), 5, 4, "fp")
    mem.save(tmp_path / "m.safetensors")
    if not torch.cuda.is_available():  # the README's Memory.load(path, device="cuda") on a machine without CUDA
        with pytest.raises(RuntimeError, match="read memory file .* cannot place it on device 'cuda'"):
            Memory.load(tmp_path / "m.safetensors", device="cuda")
    with pytest.raises(RuntimeError, match="cannot place it on device 'nonsense:0'"):
        Memory.load(tmp_path / "m.safetensors", device="nonsense:0")


def test_chunk_size_longer_than_the_context_window_is_refused(make_compressor):
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        make_compressor(chunk_size=10**6)
