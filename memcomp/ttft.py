"""Time to first token and peak memory, full context against compressed memory (seed 002, Table 7).

For each context length L (plus a ``question_tokens`` question), with random weights of the named shape:
* ``full``: the plain model prefills all L + q tokens (flash-attn if installed, else SDPA);
* ``per_embedding`` / ``per_block``: memory precomputed (the paper's setting); the decoder prefills the
  memory embeddings with their wrappers plus the question (3 n + q or n + 2 + q positions, n = ceil(L / C));
* ``end_to_end``: encode + per_embedding prefill, nothing cached;
* ``plain_same_positions``: a plain prefill of as many ordinary tokens as ``per_embedding`` uses (the memory
  path must add no cost of its own: target <= 1.1x).
TTFT is the prefill forward plus the greedy choice of the first token (LM head on the last position only,
as ``generate`` does), timed by ``memcomp.benchmarking.time_fn`` (the benchmarks' timer: CUDA events, the
host clock on a CPU): ``warmup`` runs, then exactly ``runs`` timed runs; mean, median and p20/p80. Peak
memory is the allocator's peak during one more run, reset per case.

    memcomp bench ttft --model-config qwen2.5-7b --lengths 4k,8k,16k,32k,64k,120k
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from memcomp.benchmarking import time_fn
from memcomp.runinfo import run_metadata

PAPER_H100_7B = {  # Table 7 of seed 002: context -> (TTFT full ms, TTFT ours ms, peak full GB, peak ours GB)
    4096: (126, 43, None, None), 8192: (261, 53, None, None), 16384: (577, 100, None, None),
    32768: (1450, 189, None, None), 65536: (4071, 408, None, None), 122880: (11241, 842, 37.5, 18.9),
}


def parse_lengths(text: str) -> tuple[int, ...]:
    """'4k,8k,120k' -> (4096, 8192, 122880)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        mult = 1024 if item.endswith("k") else 1
        try:
            value = int(item.rstrip("k")) * mult
        except ValueError as exc:
            raise ValueError(f"bad context length {item!r}: use integers or NNk") from exc
        if value < 1:
            raise ValueError(f"context lengths must be >= 1, got {item!r}")
        out.append(value)
    if not out:
        raise ValueError("no context lengths given")
    return tuple(out)


@dataclass(frozen=True)
class TTFTConfig:
    model_config: str = "qwen2.5-7b"
    lengths: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536, 122880)
    chunk_size: int = 16
    question_tokens: int = 32
    warmup: int = 3
    runs: int = 20
    device: str = "cuda"
    dtype: str = "bfloat16"
    end_to_end: bool = True
    out_dir: str = "runs/ttft"

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.runs < 1:
            raise ValueError(f"warmup must be >= 0 and runs >= 1, got {self.warmup}, {self.runs}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")


def peak_memory_gb(fn: Callable[[], Any], device: str) -> Optional[float]:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def _attention_implementation(device: str) -> str:
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def run_ttft(cfg: TTFTConfig, log: Callable[[str], None] = print,
             on_row: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Measure every case at every length; returns {"meta", "config", "rows", "complete"}.

    ``on_row`` receives the partial result after each length (``complete`` False until the last), so a run
    stopped by a time limit still leaves the lengths it finished (the CLI writes them as it goes).
    """
    from memcomp.compressor import MemoryCompressor
    from memcomp.config import CompressorConfig
    from memcomp.model_configs import IdTokenizer, random_model
    from memcomp.models import MODELS, load_pretrained

    device, dtype = cfg.device, getattr(torch, cfg.dtype)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("TTFT benchmark on cuda requested but CUDA is not available (use --device cpu)")
    attn = _attention_implementation(device)
    if cfg.model_config in MODELS:  # a real pretrained model (memcomp.models); the others are random weights
        model = load_pretrained(cfg.model_config, dtype=dtype, device=device, attn_implementation=attn)[0]
    else:
        model = random_model(cfg.model_config, device=device, dtype=dtype, attn_implementation=attn)
    vocab = model.config.vocab_size

    per_emb = MemoryCompressor.from_base(model, IdTokenizer(vocab), CompressorConfig(chunk_size=cfg.chunk_size,
                                                                         wrapper="per_embedding", progress=False))
    per_block = MemoryCompressor(model, per_emb.tokenizer, CompressorConfig(chunk_size=cfg.chunk_size,
                                                                            wrapper="per_block", progress=False),
                                 per_emb.projection)
    gen = torch.Generator().manual_seed(0)
    question = torch.randint(1, vocab - 2, (cfg.question_tokens,), generator=gen)

    @torch.no_grad()
    def prefill_ids(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids[None].to(device), use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].argmax()

    @torch.no_grad()
    def prefill_memory(comp, memory) -> torch.Tensor:
        batch = comp.build_decoder_inputs([memory], [question], padding_side="left")
        out = model(inputs_embeds=batch.inputs_embeds, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].argmax()

    rows: list[dict[str, Any]] = []
    meta = {**run_metadata(device), "attention": attn}
    for L in cfg.lengths:
        context = torch.randint(1, vocab - 2, (L,), generator=gen)
        full_ids = torch.cat([context, question])
        memory = per_emb.encode(context)                       # precomputed, not timed
        n = memory.n_chunks
        positions = {"full": L + cfg.question_tokens, "per_embedding": 3 * n + cfg.question_tokens,
                     "per_block": n + 2 + cfg.question_tokens}
        plain_ids = torch.randint(1, vocab - 2, (positions["per_embedding"],), generator=gen)
        cases: dict[str, Callable[[], Any]] = {
            "full": lambda ids=full_ids: prefill_ids(ids),
            "per_embedding": lambda m=memory: prefill_memory(per_emb, m),
            "per_block": lambda m=memory: prefill_memory(per_block, m),
            "plain_same_positions": lambda ids=plain_ids: prefill_ids(ids),
        }
        if cfg.end_to_end:
            cases["end_to_end"] = lambda c=context: prefill_memory(per_emb, per_emb.encode(c))
        row: dict[str, Any] = {"context": L, "chunks": n, "positions": positions,
                               "effective_ratio": {k: positions["full"] / v for k, v in positions.items()}}
        for name, fn in cases.items():
            try:
                # A latency: each run starts on an idle device, host launch work included. No L2 flush: a
                # prefill streams gigabytes of weights and KV cache through L2 anyway, and the flush buffer
                # would be one more allocation at lengths where memory is the limit.
                t = time_fn(fn, warmup=cfg.warmup, runs=cfg.runs, device=device, flush_l2=False, sync_each=True)
                t["peak_gb"] = peak_memory_gb(fn, device)
            except torch.cuda.OutOfMemoryError:
                t = {"oom": True}
                torch.cuda.empty_cache()
            row[name] = t
            log(f"  {L:>7} tokens  {name:<22} " + (f"{t['median_ms']:9.1f} ms median" if "median_ms" in t else "OOM"))
        for k in ("per_embedding", "per_block", "end_to_end"):
            if "median_ms" in row.get(k, {}) and "median_ms" in row["full"]:
                row[k]["speedup_vs_full"] = row["full"]["mean_ms"] / row[k]["mean_ms"]
                if row[k].get("peak_gb") and row["full"].get("peak_gb"):
                    row[k]["memory_saving"] = row["full"]["peak_gb"] / row[k]["peak_gb"]
        if "mean_ms" in row["per_embedding"] and "mean_ms" in row["plain_same_positions"]:
            row["memory_path_overhead"] = row["per_embedding"]["mean_ms"] / row["plain_same_positions"]["mean_ms"]
        rows.append(row)
        if on_row is not None and len(rows) < len(cfg.lengths):
            on_row({"meta": meta, "config": asdict(cfg), "rows": list(rows), "complete": False})
    return {"meta": meta, "config": asdict(cfg), "rows": rows, "complete": True}


def _ms(case: dict) -> str:
    if case.get("oom") or "mean_ms" not in case:
        return "OOM" if case.get("oom") else "-"
    return f"{case['mean_ms']:.0f}" if case["mean_ms"] >= 10 else f"{case['mean_ms']:.1f}"


def _x(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(result: dict[str, Any]) -> str:
    """Markdown table in the layout of Table 7 (mean TTFT, peak memory), plus the per-block, end-to-end and
    memory-path-overhead columns."""
    cols = ["context", "TTFT full (ms)", "TTFT ours (ms)", "speedup", "peak full (GB)", "peak ours (GB)", "saving",
            "per-block (ms)", "speedup", "end-to-end (ms)", "speedup", "memory path / plain"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        full, pe, pb = r["full"], r["per_embedding"], r["per_block"]
        e2e = r.get("end_to_end", {})
        gb = lambda c: f"{c['peak_gb']:.1f}" if c.get("peak_gb") else "-"
        cells = [f"{r['context'] // 1024}K" if r["context"] >= 1024 else str(r["context"]),
                 _ms(full), _ms(pe), _x(pe.get("speedup_vs_full")), gb(full), gb(pe), _x(pe.get("memory_saving")),
                 _ms(pb), _x(pb.get("speedup_vs_full")), _ms(e2e), _x(e2e.get("speedup_vs_full")),
                 _x(r.get("memory_path_overhead"))]
        lines.append("| " + " | ".join(cells) + " |")
    meta, cfg = result["meta"], result["config"]
    lines += ["", f"{cfg['model_config']}, random weights, {cfg['dtype']}, {meta['attention']} attention, "
                  f"C = {cfg['chunk_size']}, question {cfg['question_tokens']} tokens; mean of {cfg['runs']} runs "
                  f"after {cfg['warmup']} warm-ups; {meta['gpu']}, torch {meta['torch']}, commit {meta['commit']}, "
                  f"{meta['date'][:10]}"]
    if not result.get("complete", True):
        done = ", ".join(str(r["context"]) for r in result["rows"])
        lines.append(f"PARTIAL: the run stopped before finishing; lengths measured: {done}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    ctx = [r["context"] for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in (("full", "full context"), ("per_embedding", "memory (per-embedding)"),
                        ("per_block", "memory (per-block)"), ("end_to_end", "encode + prefill")):
        ys = [r.get(name, {}).get("mean_ms", math.nan) for r in rows]
        ax.plot(ctx, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("time to first token (ms)")
    ax.legend()
    for name in ("per_embedding", "per_block", "end_to_end"):
        ax2.plot(ctx, [r.get(name, {}).get("speedup_vs_full", math.nan) for r in rows], marker="o", label=name)
    paper = [PAPER_H100_7B[c][0] / PAPER_H100_7B[c][1] if c in PAPER_H100_7B else math.nan for c in ctx]
    ax2.plot(ctx, paper, "k--", label="paper (H100, per-embedding)")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("context tokens")
    ax2.set_ylabel("speed-up over full context")
    ax2.legend()
    fig.suptitle(f"TTFT, {result['config']['model_config']}, {result['meta']['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(result: dict[str, Any], out_dir: str, with_plot: bool = True) -> dict[str, str]:
    """JSON, Markdown table and (with matplotlib) PNG under ``out_dir``; files of the same run and date are
    overwritten, so partial results written along the way are replaced by the complete ones."""
    os.makedirs(out_dir, exist_ok=True)
    gpu = result["meta"]["gpu"].replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "")
    stem = os.path.join(out_dir, f"ttft-{result['config']['model_config']}-{gpu}-{result['meta']['date'][:10]}")
    paths = {"json": stem + ".json", "table": stem + ".md", "plot": stem + ".png"}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    with open(paths["table"], "w") as f:
        f.write(format_table(result) + "\n")
    if not with_plot or not plot(result, paths["plot"]):
        del paths["plot"]
    return paths
