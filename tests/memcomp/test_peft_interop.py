"""FQLoRA <-> peft: an exported adapter makes peft's PeftModel compute what the trained FQLoRA model computes
(LoRA and rsLoRA, every tensor FQLoRA trains outside LoRA, tied embeddings, NF4 bases), an adapter peft wrote
imports with peft's outputs, and every LoraConfig field FQLoRA does not implement is refused by name."""

import copy
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from testutil import TEXTS, assert_close_to_oracle, tiny_model

from memcomp import CompressorConfig, MemoryCompressor
from memcomp.compressor import PROJECTION_FILE
from memcomp.fqlora import (
    PEFT_IMPLEMENTED_FIELDS,
    PEFT_METADATA_FIELDS,
    PEFT_UNSUPPORTED_FIELDS,
    FQLoRAConfig,
    apply_fqlora,
    export_peft,
    fqlora_modules,
    import_peft,
    merge_fqlora,
    param_groups,
)

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lm(tokenizer, tied=False, layers=5, hidden=64):
    """tiny_model's Qwen2, or the same with tied input / output embeddings."""
    if not tied:
        return tiny_model(tokenizer, hidden=hidden, layers=layers)
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.fixture
def fqlora_compressor(base_tokenizer):
    """make(tied, **FQLoRAConfig fields) -> (FQLoRA compressor in eval mode, the causal LM as apply_fqlora found
    it, the config). Layers 0 and 4 are full-FT, 1-3 QLoRA."""
    def make(tied=False, **fields):
        tok = copy.deepcopy(base_tokenizer)
        comp = MemoryCompressor.from_base(make_lm(tok, tied), tok, CompressorConfig(chunk_size=4))
        original = copy.deepcopy(comp.model)
        config = FQLoRAConfig(**{"rank": 4, "alpha": 8.0, "dropout": 0.0, **fields})
        apply_fqlora(comp, config)
        return comp.eval(), original, config

    return make


def probe_ids(comp):
    """Token ids that read the MEM rows of the embeddings too."""
    text = comp.tokenize(TEXTS[2])
    return torch.cat([torch.tensor([comp.mem_start_id]), text, torch.tensor([comp.mem_end_id])])[None]


def peft_base(original, config):
    """What peft applies the adapter to: the original LM; for NF4, with its QLoRA layers dequantized (what the
    trained model computes with), so that the comparison measures the export and not NF4's rounding, which
    test_nf4_export_on_the_dense_original_differs_by_the_quantization_error measures."""
    base = copy.deepcopy(original)
    if config.quantize:
        merge_fqlora(apply_fqlora(base, config), include_lora=False)
    return base


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_matches_peft(ours, peft_model, ids):
    """Our fp32 logits against peft's own PeftModel: within the suite's tolerance policy (peft in fp64 as the
    oracle, at most twice peft's own fp32 error) and within 1e-5."""
    peft_model.eval()
    mine, eager = logits(ours, ids), logits(peft_model, ids)
    oracle = logits(copy.deepcopy(peft_model).double(), ids)
    assert_close_to_oracle(mine, eager, oracle, "logits against peft")
    assert (mine - eager).abs().max().item() <= 1e-5


def train_three_steps(comp):
    opt = torch.optim.AdamW(param_groups(comp, lr_lora=1e-2, lr_full=1e-2, lr_proj=1e-2))
    comp.train()
    for _ in range(3):
        out = comp(["Reconstruct:"] * 2, TEXTS[:2], contexts=TEXTS[:2])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    comp.eval()


def lora_state(model):
    return {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in fqlora_modules(model).items()}


def assert_lora_unchanged(model, before):
    after = lora_state(model)
    same = all(torch.equal(after[n][i], before[n][i]) for n in before for i in (0, 1))
    assert same, "a refused import changed the model"


# --------------------------------------------------------------------------------------------------
# Export: peft reproduces the trained model
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_after_training_reproduces_the_model_in_peft(fqlora_compressor, tmp_path, quantize, tied):
    """Issue 10, input 6: FQLoRA, three AdamW steps, export_peft, then peft loads the adapter onto the original
    model: peft must compute the trained model (full-FT layers, embeddings with the MEM rows, LM head and
    final norm travel as modules_to_save)."""
    comp, original, config = fqlora_compressor(tied=tied, quantize=quantize)
    train_three_steps(comp)
    lm = comp.model
    # Everything FQLoRA trains moved, so an export that drops any of it cannot pass.
    mem_rows = [comp.mem_start_id, comp.mem_end_id]
    now, then = lm.model, original.model
    moved = {
        "lora_B": any(m.lora_B.abs().sum() > 0 for m in fqlora_modules(comp).values()),
        "full-FT layer": not torch.equal(now.layers[0].mlp.up_proj.weight, then.layers[0].mlp.up_proj.weight),
        "full-FT bias": not torch.equal(now.layers[4].self_attn.q_proj.bias, then.layers[4].self_attn.q_proj.bias),
        "MEM rows": not torch.equal(now.embed_tokens.weight[mem_rows], then.embed_tokens.weight[mem_rows]),
        "LM head": not torch.equal(lm.lm_head.weight, original.lm_head.weight),
        "final norm": not torch.equal(now.norm.weight, then.norm.weight),
    }
    assert all(moved.values()), moved
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tied

    export_peft(comp, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(peft_base(original, config), tmp_path / "adapter")
    ids = probe_ids(comp)
    assert (logits(lm, ids) - logits(original, ids)).abs().max() > 1e-2, "training changed nothing to compare"
    assert_matches_peft(lm, loaded, ids)
    if tied:  # peft keeps the trained copies tied (ensure_weight_tying), as the trained model is
        inner = loaded.base_model.model
        head, embed = inner.lm_head.modules_to_save["default"], inner.model.embed_tokens.modules_to_save["default"]
        assert head.weight is embed.weight

    # And back into a fresh FQLoRA compressor made from the same base: the same model again, memory included.
    fresh = MemoryCompressor(copy.deepcopy(original), comp.tokenizer, comp.config, copy.deepcopy(comp.projection))
    with torch.no_grad():
        fresh.projection.weight.zero_()
    apply_fqlora(fresh, config)
    import_peft(fresh, tmp_path / "adapter")
    fresh.eval()
    torch.testing.assert_close(logits(fresh.model, ids), logits(lm, ids), rtol=0, atol=0)
    torch.testing.assert_close(fresh.encode(TEXTS[1]).embeddings, comp.encode(TEXTS[1]).embeddings, rtol=0, atol=0)


def test_nf4_export_on_the_dense_original_differs_by_the_quantization_error(fqlora_compressor, tmp_path):
    """On the dense original, peft computes the trained model with the original weights in place of the NF4
    ones in the QLoRA layers (as for any QLoRA adapter): exactly that, and nothing else, differs."""
    comp, original, config = fqlora_compressor(quantize=True)
    train_three_steps(comp)
    export_peft(comp, tmp_path / "adapter")
    ids = probe_ids(comp)
    on_dense = logits(peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter").eval(), ids)
    # The trained model with each QLoRA linear's NF4 weight replaced by the original dense one.
    expected = merge_fqlora(copy.deepcopy(comp.model))
    with torch.no_grad():
        for name, m in fqlora_modules(comp).items():
            dense = original.get_submodule(name).weight
            expected.get_submodule(name).weight.copy_(dense + m.scaling * m.lora_B @ m.lora_A)
    nf4_error = (on_dense - logits(comp.model, ids)).abs().max().item()
    assert nf4_error > 1e-4, "NF4 rounding should show: the comparison above is meaningful only then"
    assert (on_dense - logits(expected, ids)).abs().max().item() <= 1e-5


def _perturb(comp, part):
    """Change one thing FQLoRA trains (only that thing) in place."""
    lm = comp.model
    torch.manual_seed(1)
    with torch.no_grad():
        if part == "lora":
            for m in fqlora_modules(comp).values():
                m.lora_B.normal_(0, 0.1)
        elif part == "full_ft_attention":
            w = lm.model.layers[0].self_attn.q_proj.weight
            w.add_(0.2 * torch.randn_like(w))
        elif part == "full_ft_bias":
            lm.model.layers[4].self_attn.v_proj.bias.normal_(0, 0.5)
        elif part == "full_ft_norm":
            lm.model.layers[4].post_attention_layernorm.weight.mul_(1.5)
        elif part == "mem_rows":
            rows = [comp.mem_start_id, comp.mem_end_id]
            lm.model.embed_tokens.weight[rows] += torch.randn(2, lm.config.hidden_size)
        elif part == "lm_head":
            lm.lm_head.weight.add_(0.1 * torch.randn_like(lm.lm_head.weight))
        elif part == "final_norm":
            lm.model.norm.weight.mul_(1.5)
        elif part == "unfrozen_qlora_norm":  # a QLoRA layer's norm, made trainable after apply_fqlora
            norm = lm.model.layers[2].input_layernorm
            norm.weight.requires_grad_(True)
            norm.weight.mul_(1.5)
        else:
            raise AssertionError(part)


@pytest.mark.parametrize("part", ["lora", "full_ft_attention", "full_ft_bias", "full_ft_norm", "mem_rows", "lm_head",
                                  "final_norm", "unfrozen_qlora_norm"])
def test_each_trained_part_round_trips_through_peft(fqlora_compressor, tmp_path, part):
    comp, original, config = fqlora_compressor(quantize=False)
    ids = probe_ids(comp)
    before = logits(comp.model, ids)
    _perturb(comp, part)
    assert (logits(comp.model, ids) - before).abs().max() > 1e-3, f"changing {part} does not change the probe"
    export_peft(comp.model, tmp_path / "adapter")  # the LM alone: the projection has its own test
    assert_matches_peft(comp.model, peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter"), ids)

    fresh = apply_fqlora(copy.deepcopy(original), config).eval()
    import_peft(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, ids), logits(comp.model, ids), rtol=0, atol=0)
    if part == "unfrozen_qlora_norm":  # trainable again after the import, so a second export still carries it
        assert fresh.model.layers[2].input_layernorm.weight.requires_grad


def test_projection_travels_beside_the_adapter(fqlora_compressor, tmp_path):
    """The projection lives outside the causal LM, so peft never sees it: export_peft writes it to
    memcomp_projection.safetensors, import_peft restores it, and the documented peft route rebuilds the
    compressor from it; a plain-LM import refuses the file instead of dropping it."""
    comp, original, config = fqlora_compressor(quantize=False)
    with torch.no_grad():
        comp.projection.weight.add_(0.3 * torch.randn_like(comp.projection.weight))
        comp.projection.bias.normal_(0, 0.3)
    export_peft(comp, tmp_path / "adapter")
    want = comp.encode(TEXTS[0]).embeddings

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter")
    projection = torch.nn.Linear(comp.hidden_size, comp.hidden_size)
    projection.load_state_dict(load_file(str(tmp_path / "adapter" / PROJECTION_FILE)))
    rebuilt = MemoryCompressor(loaded.merge_and_unload().eval(), comp.tokenizer, comp.config, projection)
    torch.testing.assert_close(rebuilt.encode(TEXTS[0]).embeddings, want, rtol=1e-5, atol=1e-5)

    fresh = MemoryCompressor(copy.deepcopy(original), comp.tokenizer, comp.config, torch.nn.Linear(64, 64))
    apply_fqlora(fresh, config)
    plain_lm = fresh.model
    before = lora_state(plain_lm)
    with pytest.raises(ValueError, match="projection"):
        import_peft(plain_lm, tmp_path / "adapter")
    assert_lora_unchanged(plain_lm, before)
    import_peft(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh.eval().encode(TEXTS[0]).embeddings, want, rtol=0, atol=0)

    # Exporting the plain LM into the same folder removes the now stale projection file.
    export_peft(comp.model, tmp_path / "adapter")
    assert not os.path.exists(tmp_path / "adapter" / PROJECTION_FILE)


# --------------------------------------------------------------------------------------------------
# Import: adapters written by peft
# --------------------------------------------------------------------------------------------------

def peft_adapter(tmp_path, lm, **lora):
    """Save a peft LoRA adapter (all seven linears of every layer) with random A and B, so it is no no-op."""
    model = peft.get_peft_model(copy.deepcopy(lm), peft.LoraConfig(target_modules=TARGETS, **lora))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "peft_adapter")
    return tmp_path / "peft_adapter"


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_rslora_adapter_written_by_peft_imports_with_peft_scaling(base_tokenizer, tmp_path, quantize):
    """Issue 10, input 2: LoraConfig(r=8, lora_alpha=16, use_rslora=True) scales by 16 / sqrt(8), not 16 / 8."""
    lm = tiny_model(copy.deepcopy(base_tokenizer), hidden=64, layers=3)
    adapter = peft_adapter(tmp_path, lm, r=8, lora_alpha=16, use_rslora=True)
    config = FQLoRAConfig(rank=8, alpha=16.0, use_rslora=True, full_ft_layers=(), quantize=quantize, dropout=0.0)
    ours = apply_fqlora(copy.deepcopy(lm), config).eval()
    import_peft(ours, adapter)
    assert all(m.scaling == pytest.approx(16 / 8 ** 0.5) for m in fqlora_modules(ours).values())
    ids = torch.arange(3, 40)[None]
    assert_matches_peft(ours, peft.PeftModel.from_pretrained(peft_base(lm, config), adapter), ids)

    # A model built without rsLoRA refuses the adapter, naming the field, instead of scaling it wrongly.
    plain = apply_fqlora(copy.deepcopy(lm), dataclasses.replace(config, use_rslora=False))
    before = lora_state(plain)
    with pytest.raises(ValueError, match="use_rslora=True"):
        import_peft(plain, adapter)
    assert_lora_unchanged(plain, before)


def test_peft_modules_to_save_and_lora_import_together(base_tokenizer, tmp_path):
    """A peft adapter with modules_to_save (short names, matched as peft matches them) imports to peft's outputs."""
    lm = tiny_model(copy.deepcopy(base_tokenizer), hidden=64, layers=3)
    model = peft.get_peft_model(copy.deepcopy(lm), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["embed_tokens", "norm"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "a")
    config = FQLoRAConfig(rank=4, alpha=8.0, full_ft_layers=(), quantize=False, dropout=0.0)
    ours = apply_fqlora(copy.deepcopy(lm), config).eval()
    # "norm" selects every norm, those of the QLoRA layers too (peft matches name suffixes): they become trainable.
    import_peft(ours, tmp_path / "a")
    assert ours.model.layers[1].input_layernorm.weight.requires_grad
    ids = torch.arange(3, 40)[None]
    assert_matches_peft(ours, peft.PeftModel.from_pretrained(copy.deepcopy(lm), tmp_path / "a"), ids)


# Each: (field, a value FQLoRA does not implement).
REFUSED = [
    ("use_dora", True), ("lora_bias", True), ("bias", "all"), ("bias", "lora_only"), ("fan_in_fan_out", True),
    ("rank_pattern", {"q_proj": 2}), ("alpha_pattern", {"q_proj": 32}), ("layers_to_transform", [1]),
    ("layers_pattern", "layers"), ("target_parameters", ["mlp.experts.gate_up_proj"]),
    ("layer_replication", [[0, 2]]), ("trainable_token_indices", [0, 1]), ("init_lora_weights", "pissa"),
    ("init_lora_weights", "olora"), ("init_lora_weights", "corda"), ("init_lora_weights", "loftq"),
    ("init_lora_weights", "mica"), ("loftq_config", {"loftq_bits": 4}), ("use_qalora", True),
    ("alora_invocation_tokens", [5, 6]), ("megatron_config", {"tensor_model_parallel_size": 2}),
    ("a_later_lora_field", 3), ("task_type", "SEQ_CLS"), ("peft_type", "IA3"),
]


@pytest.mark.parametrize(("field", "value"), REFUSED, ids=[f"{f}={v}" for f, v in REFUSED])
def test_unimplemented_lora_fields_are_refused_by_name(base_tokenizer, tmp_path, field, value):
    lm = tiny_model(copy.deepcopy(base_tokenizer), hidden=48, layers=2)
    adapter = peft_adapter(tmp_path, lm, r=4, lora_alpha=8)
    ours = apply_fqlora(copy.deepcopy(lm), FQLoRAConfig(rank=4, alpha=8.0, full_ft_layers=(), quantize=False))
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    import_peft(ours, adapter)  # the adapter as peft wrote it imports
    before = lora_state(ours)
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field):
        import_peft(ours, adapter)
    assert_lora_unchanged(ours, before)


def test_every_peft_lora_field_is_classified():
    """A LoraConfig field that import_peft does not classify would only be caught by the generic rule (refused
    unless off): each field of the installed peft must be in one table, with peft's own default."""
    fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    tables = PEFT_METADATA_FIELDS | PEFT_IMPLEMENTED_FIELDS | set(PEFT_UNSUPPORTED_FIELDS)
    assert not set(fields) - tables, f"unclassified LoraConfig fields: {sorted(set(fields) - tables)}"
    for name, ours in PEFT_UNSUPPORTED_FIELDS.items():
        if name in fields:
            f = fields[name]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert default == ours, f"{name}: peft's default {default!r}, memcomp assumes {ours!r}"


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------

def test_base_with_another_vocabulary_is_refused(fqlora_compressor, base_tokenizer, tmp_path):
    """The adapter carries the embeddings with the MEM rows: a base without them is refused by peft (its own
    size-mismatch error) and by import_peft (naming the vocabulary)."""
    comp, original, config = fqlora_compressor(quantize=False)
    export_peft(comp.model, tmp_path / "adapter")
    unresized = tiny_model(copy.deepcopy(base_tokenizer), hidden=64, layers=5)
    assert unresized.config.vocab_size == original.config.vocab_size - 2
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(copy.deepcopy(unresized), tmp_path / "adapter")
    ours = apply_fqlora(unresized, config)
    with pytest.raises(ValueError, match="vocabulary of 322 tokens, this model has 320"):
        import_peft(ours, tmp_path / "adapter")
    # Resized to the adapter's rows, the base works (the adapter supplies every row).
    resized = tiny_model(copy.deepcopy(base_tokenizer), hidden=64, layers=5)
    resized.resize_token_embeddings(original.config.vocab_size)
    ids = probe_ids(comp)
    assert_matches_peft(comp.model, peft.PeftModel.from_pretrained(resized, tmp_path / "adapter"), ids)


def test_untied_adapter_into_a_tied_model_is_refused(fqlora_compressor, tmp_path):
    comp, _, _ = fqlora_compressor(quantize=False)
    export_peft(comp.model, tmp_path / "adapter")
    tied, _, _ = fqlora_compressor(tied=True, quantize=False)
    before = lora_state(tied)
    with pytest.raises(ValueError, match="ties its input and output embeddings"):
        import_peft(tied.model, tmp_path / "adapter")
    assert_lora_unchanged(tied, before)


def test_adapters_that_do_not_fit_the_fqlora_layers_are_refused(fqlora_compressor, tmp_path):
    comp, _, config = fqlora_compressor(quantize=False)
    export_peft(comp.model, tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    weights_path = str(tmp_path / "adapter" / "adapter_model.safetensors")
    good_cfg, good_weights = cfg_path.read_text(), load_file(weights_path)
    before = lora_state(comp)

    def expect(match, cfg=None, weights=None):
        cfg_path.write_text(json.dumps(cfg) if cfg is not None else good_cfg)
        save_file(weights if weights is not None else good_weights, weights_path)
        with pytest.raises(ValueError, match=match):
            import_peft(comp.model, tmp_path / "adapter")
        assert_lora_unchanged(comp, before)

    cfg = json.loads(good_cfg)
    expect(r"FQLoRAConfig\(rank=8", {**cfg, "r": 8})
    expect("lora_alpha=16", {**cfg, "lora_alpha": 16})
    # modules_to_save over a QLoRA layer: FQLoRA keeps its base frozen, so it cannot take that layer.
    expect("full-FT layer", {**cfg, "modules_to_save": cfg["modules_to_save"] + ["model.layers.1"]})
    q = "base_model.model.model.layers.1.self_attn.q_proj"
    expect("frozen base of FQLoRA layer", weights={**good_weights, f"{q}.weight": torch.zeros(64, 64)})
    expect("no adapter weights for 1 FQLoRA layers",
           weights={k: v for k, v in good_weights.items() if not k.startswith(q + ".lora_B")})
    expect("has no base_model.model.model.norm.weight",
           weights={k: v for k, v in good_weights.items() if k != "base_model.model.model.norm.weight"})
    expect("matches no tensor", weights={**good_weights, "base_model.model.model.extra.weight": torch.zeros(2)})
    os.remove(weights_path)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        import_peft(comp.model, tmp_path / "adapter")


def test_export_refuses_layers_with_different_settings(fqlora_compressor, tmp_path):
    comp, _, _ = fqlora_compressor(quantize=False)
    next(iter(fqlora_modules(comp).values())).alpha = 2.0
    with pytest.raises(ValueError, match="differ in"):
        export_peft(comp, tmp_path / "adapter")
    with pytest.raises(ValueError, match="no FQLoRA layers"):
        export_peft(merge_fqlora(comp), tmp_path / "adapter")
