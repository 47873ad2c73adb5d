"""memcomp on a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, GQA 9 / 3 heads, tied embeddings,
ChatML), installed by scripts/setup.sh and loaded once per session (tests/memcomp/conftest.py).

What the tiny random models cannot show: the compressor, packed training, FQLoRA and the TTFT suite on the weights
and tokenizer of a model people use, and the prompt formats against the model's own chat template."""

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F

from memcomp import CompressorConfig, Memory, MemoryCompressor
from memcomp.packing import PackingCollator
from memcomp.tasks import SYSTEM_PROMPT, SampleBuilder

PASSAGE = ("The threading module constructs higher-level threading interfaces on top of the lower level _thread "
           "module. A thread-local object keeps its attributes separate for every thread that uses it, so two "
           "threads never see each other's values.")


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _chat_ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return out if isinstance(out, torch.Tensor) else out["input_ids"]


def test_the_model_is_the_documented_one_and_answers(smollm2_loaded):
    model, tok = smollm2_loaded
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == ("llama", 30, 576, 9, 3, 64, 49152)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 134.5
    assert model.dtype == torch.float32 and tok.eos_token == "<|im_end|>"
    ids = _chat_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_encode_generate_save_and_load_on_a_real_llama_with_tied_embeddings(smollm2, tmp_path):
    model, tok = smollm2
    table_norm = float(model.get_input_embeddings().weight.detach().norm(dim=-1).mean())
    comp = MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=16))
    emb, head = comp.model.get_input_embeddings(), comp.model.get_output_embeddings()
    assert emb.weight.shape[0] == len(tok) == 49154 and head.weight is emb.weight  # MEM tokens added, still tied
    n = len(_ids(tok, PASSAGE))
    mem = comp.encode(PASSAGE)
    assert mem.embeddings.shape == (-(-n // 16), 576) and mem.num_tokens == n
    # The default projection (scaled_normal) starts the memory at the scale of the decoder's input embeddings;
    # the pooled final-norm outputs themselves are ~15x larger.
    ratio = float(mem.embeddings.norm(dim=-1).mean()) / table_norm
    assert 0.7 < ratio < 1.4, ratio
    default = comp.projection.weight.detach().clone()
    with torch.no_grad():
        comp.projection.weight.copy_(torch.eye(576))
        assert float(comp.encode(PASSAGE).embeddings.norm(dim=-1).mean()) / table_norm > 8
        comp.projection.weight.copy_(default)
    mem = comp.encode(PASSAGE)
    prompt = "\nRestore the text held in memory.\n"
    text = comp.generate(mem, prompt, max_new_tokens=6)
    assert len(text) == 1 and isinstance(text[0], str)

    comp.save_pretrained(tmp_path / "c")
    mem.save(tmp_path / "doc.mem.safetensors")
    back = MemoryCompressor.from_pretrained(tmp_path / "c")
    assert back.model.get_output_embeddings().weight is back.model.get_input_embeddings().weight
    assert back.fingerprint() == comp.fingerprint()
    again = back.encode(PASSAGE)
    assert torch.equal(again.embeddings, mem.embeddings)
    loaded = Memory.load(tmp_path / "doc.mem.safetensors")
    assert back.generate(loaded, prompt, max_new_tokens=6) == text


def _samples(tok, sb):
    rng = random.Random(0)
    doc = _ids(tok, PASSAGE)
    return [sb.reconstruction(doc[:22], rng), sb.continuation(doc[:40], rng, n_bridge=1), sb.lm(doc[5:25]),
            sb.qa(doc[:13], "Which module is it built on?", _ids(tok, " _thread"))]


def _unpacked_losses(comp, s):
    if s.task == "lm":
        ids = torch.tensor(s.target)[None]
        logits = comp.model(input_ids=ids).logits[0, :-1]
        return F.cross_entropy(logits, ids[0, 1:], reduction="none")
    return comp(instructions=[s.after], targets=[s.target[:-1]], contexts=[s.context]).token_losses


def test_packed_forward_equals_unpacked_losses_and_gradients_on_the_real_model(smollm2):
    model, tok = smollm2
    torch.manual_seed(0)
    comp = MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=4))
    samples = _samples(tok, SampleBuilder(tok, "flat", chunk_size=4))
    (batch,) = PackingCollator.from_compressor(comp, max_tokens=1024)(samples)
    assert len(batch.sample_index) == len(samples)
    layers = comp.model.model.layers
    params = {"projection": comp.projection.weight, "embeddings = LM head": comp.model.get_input_embeddings().weight,
              "layer 0 q_proj": layers[0].self_attn.q_proj.weight,
              "layer 15 k_proj": layers[15].self_attn.k_proj.weight,
              "layer 29 down_proj": layers[29].mlp.down_proj.weight, "final norm": comp.base.norm.weight}
    out = comp.forward_packed(batch)
    g_packed = torch.autograd.grad(out.token_losses.sum(), list(params.values()))
    ref = torch.cat([_unpacked_losses(comp, samples[i]) for i in batch.sample_index])
    g_ref = torch.autograd.grad(ref.sum(), list(params.values()))
    assert out.num_target_tokens == ref.numel()
    torch.testing.assert_close(out.token_losses, ref, rtol=1e-4, atol=1e-4)
    # Relative to each gradient's norm, not entry by entry: the model's massive activations (hidden dimension 199
    # is ~40x the others after the final norm) put projection gradients of ~300 beside ones of 1e-3, so fp32
    # summation in another order moves single entries by far more than an absolute tolerance allows. Measured
    # over seven random projections: 2e-5 to 1e-4 for the model's tensors, 4e-5 to 4.4e-4 for the projection's
    # (the outer product with those pooled values); a token attending across two packed samples, or positions
    # that do not restart per chunk, change the gradients by orders of magnitude more.
    for name, a, b in zip(params, g_packed, g_ref):
        assert b.abs().max() > 0, f"no gradient reached {name}"
        rel = float((a - b).norm() / b.norm())
        assert rel < 2e-3, f"{name}: packed and unpacked gradients differ by {rel:.2e} (relative, Frobenius)"


def test_fqlora_apply_merge_and_peft_round_trip_on_the_real_model(smollm2, tmp_path):
    peft = pytest.importorskip("peft")
    from memcomp.fqlora import (
        FQLoRAConfig,
        apply_fqlora,
        default_full_ft_layers,
        export_peft,
        fqlora_modules,
        merge_fqlora,
    )

    model, tok = smollm2
    ids = torch.tensor([_ids(tok, PASSAGE)[:24]])
    apply_fqlora(model, FQLoRAConfig(rank=8, alpha=16, dropout=0.0))
    full = default_full_ft_layers(30)
    assert full[0] == 0 and full[-1] == 29 and len(full) == 11
    assert len(fqlora_modules(model)) == 7 * (30 - len(full))
    torch.manual_seed(0)
    with torch.no_grad():
        for m in fqlora_modules(model).values():
            m.lora_B.normal_(0, 0.02)
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    export_peft(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    base = merge_fqlora(copy.deepcopy(model), include_lora=False)     # the NF4 base, dense: what peft loads onto
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    del base, loaded
    merged = merge_fqlora(model)
    assert not fqlora_modules(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_chatml_prompt_is_the_models_own_template(smollm2):
    """SampleBuilder's ChatML layout around the memory is SmolLM2's chat template with the memory at the start of
    the user turn, its markers single special tokens; with an empty memory the compressor's inputs_embeds path
    answers exactly as the model does from the template's token ids."""
    model, tok = smollm2
    sb = SampleBuilder(tok, "chatml", chunk_size=16)
    question = "What is the capital of France?"
    before, after = sb.prompt(question)
    template = tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": "\n" + question}],
                                       add_generation_prompt=True, tokenize=False)
    assert tok.decode(before) + tok.decode(after) == template
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert before.count(start) == 2 and after.count(start) == 1 and after.count(end) == 1
    assert sb.qa(_ids(tok, PASSAGE), question, _ids(tok, "Paris")).target[-1] == end == tok.eos_token_id

    comp = MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=16))
    empty = comp.encode("")
    assert empty.n_chunks == 0
    ours = comp.generate(empty, after, prefixes=[before], max_new_tokens=10)[0]
    ids = torch.tensor([before + after])
    with torch.no_grad():
        ref = comp.model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert ours == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True) and ours.strip()
    # With a passage's memory (untrained: no claim about the content) the same path runs and stops at <|im_end|>.
    assert isinstance(comp.generate(comp.encode(PASSAGE), after, prefixes=[before], max_new_tokens=4)[0], str)


def test_ttft_suite_cpu_run_on_the_real_model():
    from memcomp.ttft import TTFTConfig, format_table, run_ttft

    cfg = TTFTConfig(model_config="smollm2-135m-instruct", lengths=(128,), question_tokens=8, warmup=0, runs=1,
                     device="cpu", dtype="float32")
    res = run_ttft(cfg, log=lambda _: None)
    (row,) = res["rows"]
    assert row["chunks"] == 8 and row["positions"] == {"full": 136, "per_embedding": 32, "per_block": 18}
    for case in ("full", "per_embedding", "per_block", "end_to_end", "plain_same_positions"):
        assert row[case]["runs"] == 1 and row[case]["median_ms"] > 0
    assert "| 128 |" in format_table(res)


def test_smollm2_demo_preset_refuses_a_cpu_with_an_estimate(capsys):
    from memcomp.cli import main
    from memcomp.demo.run import cpu_refusal, make_config, run

    cfg, _ = make_config("smollm2", "cpt", ["device=cpu"])
    assert (cfg.recipe, cfg.compressor.model_dir, cfg.compressor.chunk_size, cfg.fqlora.enabled) == (
        "smollm2", "smollm2-135m-instruct", 4, False)
    assert cfg.compressor.projection_init == "scaled_normal" and 0 < cfg.run.time_limit_min < 10
    assert main(["demo", "--preset", "smollm2", "device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "needs a GPU" in err and "would take about 53 hours" in err
    assert "about 3 hours" in cpu_refusal("smollm2", make_config("smollm2", "cpt", ["device=cpu", "steps=100"])[0])
    with pytest.raises(RuntimeError, match="needs a GPU"):
        run("smollm2", "cpt", ["device=cpu"])
    assert cpu_refusal("tiny", make_config("tiny", "cpt", [])[0]) is None


def test_smollm2_recipe_trains_on_the_real_model_and_stops_at_its_time_limit(tmp_path, capsys):
    """The GPU preset's own pipeline (registered model, stdlib data without a tokenizer of its own, full
    fine-tuning, packed rows), one CPU step; a time limit ends the run after the step that reaches it."""
    from memcomp.trainers import apply_overrides, recipe, train

    cfg = apply_overrides(recipe("smollm2", "cpt1"), [
        "device=cpu", "dtype=float32", "steps=3", "samples_per_step=2", "doc_tokens=16", "save_every=0",
        "eval_every=0", "time_limit_min=1e-6", f"out_dir={json.dumps(str(tmp_path / 'cpt'))}"])
    result = train(cfg)
    assert result["stopped_by_time_limit"] and result["steps_this_run"] == 1
    assert [r["step"] for r in result["history"]] == [1] and 0 < result["history"][0]["loss"] < 20
    assert "time limit of 1e-06 min reached at step 1 of 3" in capsys.readouterr().err
    assert not (tmp_path / "data" / "tokenizer").exists()  # SmolLM2 brings its own
    comp = MemoryCompressor.from_pretrained(tmp_path / "cpt" / "compressor")
    assert comp.model.config.num_hidden_layers == 30 and comp.config.chunk_size == 4
