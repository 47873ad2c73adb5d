"""Model shapes used by benchmarks and recipes: the real Qwen2.5 configurations, built with random weights
(time and memory do not depend on the values; nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import torch

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen2.5-32b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=131072,
                        rope_theta=1_000_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # CPU smoke shapes for the same code paths.
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def qwen2_config(name: str, **overrides: Any):
    from transformers import Qwen2Config

    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    return Qwen2Config(**{**MODEL_CONFIGS[name], **overrides})


def random_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 attn_implementation: str | None = None):
    """A Qwen2ForCausalLM of the named shape with random weights, created directly on ``device``."""
    from transformers import Qwen2ForCausalLM

    cfg = qwen2_config(name)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(cfg, dtype=dtype, **kwargs)
    return model.eval()


def flops_per_token(cfg, context: int) -> float:
    """Forward FLOPs for one token attending to ``context`` earlier tokens (matmuls only)."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = d // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    linear = 2 * L * (d * d + 2 * d * kv + d * d + 3 * d * f)
    attention = 2 * L * 2 * context * cfg.num_attention_heads * hd
    return float(linear + attention)


class IdTokenizer:
    """Stands in for a tokenizer where everything is token ids (random-weight models have none): the last
    two ids of the vocabulary are <MEM_START> and <MEM_END>, id 0 pads and ends."""

    pad_token_id = eos_token_id = 0

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def add_tokens(self, tokens, special_tokens: bool = True) -> int:
        return 0

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab_size - 2 if token == "<MEM_START>" else self.vocab_size - 1

    def __len__(self) -> int:
        return self.vocab_size
