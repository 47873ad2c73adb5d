"""Helpers shared by the test tiers (imported as ``testutil``; tests/conftest.py puts tests/_support on sys.path)."""

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

TEXTS = [
    "Return a new list containing all items from the iterable in ascending order. "
    "A custom key function can be supplied to customize the sort order.",
    "Open file and return a stream. Raise OSError upon failure. The file is either a text or byte string.",
    "Compressed memory lets a language model read a long context through a few dense vectors per chunk.",
]

def assert_close_to_oracle(ours: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, name: str = "",
                           factor: float = 2.0) -> None:
    """The tolerance policy (one place): our max error against the fp64 oracle must be at most ``factor``
    times the error of the same computation in eager PyTorch at our precision, plus a floor of a few ulps
    of the output's scale (for when eager happens to be exact)."""
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    o, e, r = ours.double(), eager.double(), oracle.double()
    err_ours = (o - r).abs().max().item()
    err_eager = (e - r).abs().max().item()
    ulp = torch.finfo(ours.dtype).eps * max(r.abs().max().item(), 1e-30)
    bound = factor * err_eager + 4 * ulp
    assert err_ours <= bound, (f"{name}: error {err_ours:.3e} vs oracle exceeds {factor}x eager's "
                               f"{err_eager:.3e} (+4 ulp {ulp:.1e}) in {ours.dtype}")


def tiny_model(tokenizer, family="qwen2", hidden=48, layers=2, seed=0):
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    return model_cls(cfg_cls(**common)).eval()
