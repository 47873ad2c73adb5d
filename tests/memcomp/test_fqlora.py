"""FQLoRA: the hybrid full-FT / NF4 QLoRA transform, parameter groups, merge, PEFT round trip."""

import copy

import pytest
import torch
import torch.nn.functional as F
from testutil import TEXTS, assert_close_to_oracle, tiny_model

from memcomp import CompressorConfig, MemoryCompressor
from memcomp.fqlora import (
    FQLoRAConfig,
    FQLoRALinear,
    apply_fqlora,
    default_full_ft_layers,
    export_peft,
    fqlora_modules,
    import_peft,
    memory_report,
    merge_fqlora,
    merged_state_dict,
    param_groups,
)
from memcomp.fused import use_backend

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def compressor(base_tokenizer):
    tok = copy.deepcopy(base_tokenizer)
    model = tiny_model(tok, hidden=64, layers=5)
    return MemoryCompressor.from_base(model, tok, CompressorConfig(chunk_size=4))


def test_default_full_ft_layers_match_the_paper():
    assert default_full_ft_layers(28) == tuple(range(0, 28, 3))          # Qwen2.5-7B: 0, 3, ..., 27
    big = default_full_ft_layers(64)                                    # Qwen2.5-32B: 23 of 64
    assert len(big) == 23 and big[0] == 0 and big[-1] == 63
    assert max(b - a for a, b in zip(big, big[1:])) <= 3
    assert default_full_ft_layers(5) == (0, 4) and default_full_ft_layers(1) == (0,)


def test_exactly_the_expected_parameters_are_trainable(compressor):
    apply_fqlora(compressor, FQLoRAConfig(rank=4, alpha=8))
    trainable = {n for n, p in compressor.named_parameters() if p.requires_grad}
    expected = {"projection.weight", "projection.bias", "model.model.embed_tokens.weight", "model.model.norm.weight",
                "model.lm_head.weight"}
    for i in (0, 4):  # full fine-tuning
        expected |= {n for n, _ in compressor.named_parameters() if n.startswith(f"model.model.layers.{i}.")}
    for i in (1, 2, 3):  # QLoRA: adapters only
        for t in TARGETS:
            sub = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            expected |= {f"model.model.layers.{i}.{sub}.{t}.lora_A", f"model.model.layers.{i}.{sub}.{t}.lora_B"}
    assert trainable == expected
    assert len(fqlora_modules(compressor)) == 3 * len(TARGETS)
    assert all(m.quantized and m.nf4_packed.dtype == torch.uint8 for m in fqlora_modules(compressor).values())


def test_training_lowers_the_loss_and_merge_agrees(compressor):
    apply_fqlora(compressor, FQLoRAConfig(rank=4, alpha=8, dropout=0.0))
    opt = torch.optim.AdamW(param_groups(compressor, lr_lora=1e-2, lr_full=1e-3, lr_proj=1e-2))
    losses = []
    for _ in range(8):
        out = compressor(["Reconstruct:"] * 2, TEXTS[:2], contexts=TEXTS[:2])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0] - 0.5, losses
    lora_B = next(iter(fqlora_modules(compressor).values())).lora_B
    assert lora_B.abs().sum() > 0, "LoRA B never moved"

    ids = compressor.tokenize(TEXTS[2])[None]
    compressor.eval()
    with torch.no_grad():
        before = compressor.model(input_ids=ids).logits
        mem_before = compressor.encode(TEXTS[2]).embeddings
        merge_fqlora(compressor)
        after = compressor.model(input_ids=ids).logits
        mem_after = compressor.encode(TEXTS[2]).embeddings
    assert not fqlora_modules(compressor)
    assert all(isinstance(m, torch.nn.Linear) for n, m in compressor.model.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mem_after, mem_before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_peft_export_loads_in_peft_and_reproduces_outputs(compressor, tmp_path, backend):
    peft = pytest.importorskip("peft")
    model = compressor.model
    apply_fqlora(model, FQLoRAConfig(rank=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for m in fqlora_modules(model).values():
            m.lora_B.normal_(0, 0.1)
    model.eval()
    ids = compressor.tokenize(TEXTS[0])[None]
    with torch.no_grad(), use_backend(backend):
        ours = model(input_ids=ids).logits
    export_peft(model, tmp_path / "adapter")
    base = merge_fqlora(copy.deepcopy(model), include_lora=False)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    # And back: zero our adapters, import the adapter, same outputs again.
    with torch.no_grad():
        for m in fqlora_modules(model).values():
            m.lora_A.zero_()
            m.lora_B.zero_()
    import_peft(model, tmp_path / "adapter")
    with torch.no_grad(), use_backend(backend):
        torch.testing.assert_close(model(input_ids=ids).logits, ours)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_lora_scaling_in_forward_and_merge(use_rslora):
    """y = x W^T + b + s x A^T B^T with s = alpha / r, or alpha / sqrt(r) for rsLoRA; merging folds the same s."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40)
    layer = FQLoRALinear(base, rank=9, alpha=6.0, dropout=0.0, quantize=False, use_rslora=use_rslora).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    s = 6.0 / 3.0 if use_rslora else 6.0 / 9.0
    assert layer.scaling == pytest.approx(s)
    x = torch.randn(5, 24, dtype=torch.float64)

    def formula(x, w, b, a_, b_):
        return F.linear(x, w, b) + s * x @ a_.T @ b_.T

    want = formula(x, base.weight.double(), base.bias.double(), layer.lora_A.double(), layer.lora_B.double())
    eager = formula(x.float(), base.weight, base.bias, layer.lora_A, layer.lora_B)
    with torch.no_grad():
        assert_close_to_oracle(layer(x.float()), eager.detach(), want.detach(), f"forward, use_rslora={use_rslora}")
    holder = torch.nn.Sequential(layer)
    state = merged_state_dict(holder)
    assert set(state) == {"0.weight", "0.bias"}
    torch.testing.assert_close(state["0.weight"].double(), base.weight.double() + s * layer.lora_B.double()
                               @ layer.lora_A.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_pretrained_writes_fqlora_layers_as_dense_linears(base_tokenizer, tmp_path, tied):
    """transformers' from_pretrained does not know FQLoRA's NF4 + LoRA tensors and would load those layers at
    random: the saved compressor must hold them merged and come back as merge_fqlora's dense model."""
    import transformers

    tok = copy.deepcopy(base_tokenizer)
    torch.manual_seed(0)
    lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, tie_word_embeddings=tied, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    comp = MemoryCompressor.from_base(lm, tok, CompressorConfig(chunk_size=4))
    apply_fqlora(comp, FQLoRAConfig(rank=4, alpha=8, use_rslora=True))
    with torch.no_grad():
        for m in fqlora_modules(comp).values():
            m.lora_B.normal_(0, 0.1)
    comp.eval()
    ids = comp.tokenize(TEXTS[0])[None]
    merged = merge_fqlora(copy.deepcopy(comp))
    comp.save_pretrained(tmp_path / "c")
    assert fqlora_modules(comp), "saving must not merge the model itself"
    back = MemoryCompressor.from_pretrained(tmp_path / "c")
    assert (back.model.lm_head.weight is back.model.model.embed_tokens.weight) == tied
    with torch.no_grad():
        want = merged.model(input_ids=ids).logits
        torch.testing.assert_close(back.model(input_ids=ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(comp.model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_param_groups_follow_table_9_without_overlap(compressor):
    apply_fqlora(compressor, FQLoRAConfig(rank=4))
    groups = param_groups(compressor)
    by_name = {g["name"]: g for g in groups}
    assert (by_name["lora"]["lr"], by_name["lora"]["weight_decay"]) == (1e-4, 0.0)
    assert (by_name["full"]["lr"], by_name["full"]["weight_decay"]) == (5e-5, 0.1)
    assert by_name["projection"]["lr"] == 3e-4
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in compressor.parameters() if p.requires_grad}
    assert {id(p) for p in by_name["projection"]["params"]} == {id(p) for p in compressor.projection.parameters()}
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in compressor.named_parameters()
               if id(p) in {id(q) for q in by_name["lora"]["params"]})


def test_plain_lora_without_quantization(compressor):
    apply_fqlora(compressor, FQLoRAConfig(rank=2, quantize=False))
    m = next(iter(fqlora_modules(compressor).values()))
    assert not m.quantized and m.weight.dtype == torch.float32
    out = compressor(["Go"], [TEXTS[0]], contexts=[TEXTS[0]])
    out.loss.backward()
    assert m.lora_A.grad is not None


def test_memory_report(compressor, capsys):
    apply_fqlora(compressor, FQLoRAConfig(rank=4))
    rep = memory_report(compressor)
    expected = 0
    for m in fqlora_modules(compressor).values():
        n = m.in_features * m.out_features
        blocks = -(-n // 64)
        # packed codes, 8-bit absmax codes, fp32 absmax per 256 blocks, the 256-entry map, the offset
        expected += (n + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4
    assert rep["frozen_nf4_bytes"] == expected
    assert rep["trainable_params"] == sum(p.numel() for p in compressor.parameters() if p.requires_grad)
    assert rep["optimizer_state_bytes"] == 12 * rep["trainable_params"]
    assert "frozen_nf4_bytes" in capsys.readouterr().out


def test_bad_inputs(compressor):
    with pytest.raises(ValueError, match="rank"):
        FQLoRAConfig(rank=0)
    with pytest.raises(ValueError, match="use_rslora"):
        FQLoRAConfig(use_rslora="yes")
    for bad in ({"rank": 0}, {"alpha": 0.0}, {"dropout": 1.0}, {"use_rslora": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FQLoRALinear(torch.nn.Linear(4, 4), **{"rank": 2, "alpha": 4.0, "dropout": 0.0, **bad})
    with pytest.raises(ValueError, match="out of range"):
        apply_fqlora(compressor, FQLoRAConfig(full_ft_layers=(0, 5)))
    with pytest.raises(ValueError, match="no linear named"):
        apply_fqlora(copy.deepcopy(compressor), FQLoRAConfig(target_modules=("q_proj", "qkv_proj")))
    apply_fqlora(compressor, FQLoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has FQLoRA"):
        apply_fqlora(compressor)
    with pytest.raises(ValueError, match="base_model.layers"):
        apply_fqlora(torch.nn.Linear(3, 3))
    assert isinstance(next(iter(fqlora_modules(compressor).values())), FQLoRALinear)


def test_apply_fqlora_keeps_the_models_train_or_eval_mode(base_tokenizer):
    """New FQLoRA layers take the mode of the linears they replace: an eval model applies no LoRA dropout."""
    from testutil import tiny_model

    from memcomp.fqlora import FQLoRAConfig, apply_fqlora, fqlora_modules

    for training in (False, True):
        model = tiny_model(base_tokenizer).train(training)
        apply_fqlora(model, FQLoRAConfig(rank=2, dropout=0.5, full_ft_layers=(0,)))
        assert {m.training for m in fqlora_modules(model).values()} == {training}


def test_a_model_too_small_for_any_lora_layer_says_so(base_tokenizer, tmp_path):
    """A newcomer's input: apply_fqlora on a 2-layer model made every layer full fine-tuning, silently, and then
    export_peft said "apply_fqlora first"."""
    from testutil import tiny_model

    from memcomp.fqlora import apply_fqlora, export_peft

    model = tiny_model(base_tokenizer, layers=2)
    with pytest.warns(UserWarning, match="all 2 decoder layers are fully fine-tuned"):
        apply_fqlora(model)
    with pytest.raises(ValueError, match="every layer is fully fine-tuned"):
        export_peft(model, tmp_path / "adapter")
