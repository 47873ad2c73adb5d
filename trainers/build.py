"""Building a run's components, each from its own section of the config: the compressor (``compressor`` +
``fqlora``), the sample stream (``data``), the optimizer and schedule (``optim``)."""

from __future__ import annotations

import math
import os

import torch
from memcomp.trainers.config import CompressorSettings, DataSettings, FQLoRASettings, OptimSettings

from memcomp.compressor import MemoryCompressor
from memcomp.config import CompressorConfig
from memcomp.data import MIXTURES, JsonlReader, SampleStream
from memcomp.fqlora import FQLoRAConfig, apply_fqlora, param_groups
from memcomp.tasks import SampleBuilder


def resolve_device(device: str) -> str:
    """``run.device``: "auto" is cuda when available, else cpu."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_compressor(c: CompressorSettings, fqlora: FQLoRASettings, *, device: str, dtype: str,
                     seed: int) -> MemoryCompressor:
    """The compressor a run trains: loaded from ``init_from``, built on ``model_dir``, or the tiny demo model
    (seeded by ``seed``); FQLoRA applied when enabled (and not already there), the projection frozen, activation
    checkpointing on, as the settings say. Raises ``FileNotFoundError`` for a missing tokenizer or checkpoint."""
    torch_dtype = getattr(torch, dtype)
    if c.init_from:
        comp = MemoryCompressor.from_pretrained(c.init_from, dtype=torch_dtype)
    elif c.model_dir:
        from memcomp.models import load_pretrained

        model, tok = load_pretrained(c.model_dir, dtype=torch_dtype)  # a registered name, HF folder or GGUF file
        comp = MemoryCompressor.from_base(model, tok, CompressorConfig(
            chunk_size=c.chunk_size, wrapper=c.wrapper, projection_init=c.projection_init))
    else:
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        if not os.path.isdir(c.tokenizer_dir):
            raise FileNotFoundError(f"the tiny model needs a tokenizer directory, got compressor.tokenizer_dir="
                                    f"{c.tokenizer_dir!r} (the demo recipes write one)")
        tok = AutoTokenizer.from_pretrained(c.tokenizer_dir)
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tok), hidden_size=c.tiny_hidden, num_hidden_layers=c.tiny_layers, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=int(c.tiny_hidden * 2.75) // 8 * 8, max_position_embeddings=4096,
            tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        comp = MemoryCompressor.from_base(model.to(torch_dtype), tok, CompressorConfig(
            chunk_size=c.chunk_size, wrapper=c.wrapper, projection_init=c.projection_init))
    if fqlora.enabled and not any(n.endswith("lora_A") for n, _ in comp.named_parameters()):
        apply_fqlora(comp, FQLoRAConfig(rank=fqlora.rank, alpha=fqlora.alpha, dropout=fqlora.dropout))
    if c.freeze_projection:
        comp.projection.requires_grad_(False)
    if c.activation_checkpointing:
        comp.enable_activation_checkpointing()
    return comp.to(resolve_device(device))


def build_stream(d: DataSettings, comp: MemoryCompressor, *, stage: str, seed: int,
                 validation: bool = False) -> SampleStream:
    """The task mixture's sample stream over the data files (the validation files with ``validation``)."""
    builder = SampleBuilder(comp.tokenizer, d.prompt_format, boxed=False, chunk_size=comp.config.chunk_size,
                            instructions=d.instructions)
    files = {"text": d.val_text_file if validation else d.text_file,
             "qa": d.val_qa_file if validation else d.qa_file,
             "trace": d.val_trace_file if validation else d.trace_file,
             "summary": "" if validation else d.summary_file}
    readers = {k: JsonlReader(p, k, d.max_bad_fraction, shuffle=not validation, seed=seed)
               for k, p in files.items() if p}
    return SampleStream(builder, MIXTURES[d.mixture or stage], readers,
                        seed=seed + (10_000 if validation else 0), doc_tokens=d.doc_tokens)


def has_validation(d: DataSettings, stage: str) -> bool:
    """Whether the stage's mixture has validation data: its trace file for the reasoner mixture, else a validation
    text or QA file."""
    if "trace" in dict(MIXTURES[d.mixture or stage].tasks):
        return bool(d.val_trace_file)
    return bool(d.val_text_file or d.val_qa_file)


def build_optimizer(o: OptimSettings, comp: MemoryCompressor):
    """AdamW over FQLoRA's named parameter groups (lora / full / projection) and the schedule: linear warm-up over
    ``warmup_ratio`` of the steps, then cosine down to ``min_lr_ratio``."""
    groups = param_groups(comp, lr_lora=o.lr_lora, lr_full=o.lr_full, lr_proj=o.lr_proj, wd_lora=o.wd_lora,
                          wd_full=o.wd_full)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))  # groups keep their "name" (lora / full / projection)
    warmup = int(round(o.warmup_ratio * o.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, o.steps - warmup))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
