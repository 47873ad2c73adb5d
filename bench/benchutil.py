"""Benchmark plumbing: timing, hardware ceilings measured in the same run, metadata, results files."""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from typing import Optional

import torch

from memcomp.runinfo import run_metadata

HAS_CUDA = torch.cuda.is_available()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.environ.get("MEMCOMP_BENCH_RESULTS", os.path.join(REPO, "bench", "results"))


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def time_ms(fn, warmup: int = 3, rep: int = 20) -> dict[str, float]:
    """Median and p20/p80 in ms: device events via triton.testing.do_bench on a GPU, else host clock."""
    if HAS_CUDA:
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1]}


@functools.lru_cache(maxsize=1)
def ceilings() -> dict[str, float]:
    """Measured on this device now: copy bandwidth (read + write bytes) and a large bf16 GEMM rate."""
    if not HAS_CUDA:
        return {"bandwidth_gbs": float("nan"), "gemm_tflops": float("nan")}
    bw = _copy_bandwidth_gbs()
    tflops = _gemm_tflops()
    torch.cuda.empty_cache()
    return {"bandwidth_gbs": bw, "gemm_tflops": tflops}


def _copy_bandwidth_gbs() -> float:
    x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()  # 1 GiB, far beyond L2
    y = torch.empty_like(x)
    t = time_ms(lambda: y.copy_(x))["median_ms"]
    return 2 * x.numel() * x.element_size() / (t * 1e-3) / 1e9


def _gemm_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    t = time_ms(lambda: a @ b)["median_ms"]
    return 2 * n**3 / (t * 1e-3) / 1e12


def floor_ms(bytes_moved: float, flops: float) -> float:
    c = ceilings()
    return max(bytes_moved / (c["bandwidth_gbs"] * 1e9), flops / (c["gemm_tflops"] * 1e12)) * 1e3


def metadata() -> dict[str, str]:
    return run_metadata("cuda" if HAS_CUDA else "cpu")


def peak_mb(fn) -> Optional[float]:
    """Peak CUDA memory of one call of ``fn`` above what was allocated before it (None on a CPU)."""
    if not HAS_CUDA:
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def write_results(name: str, rows: list[dict]) -> str | None:
    """bench/results/<name>-<gpu>-<date>.json on a GPU; CPU smoke runs only print."""
    meta = metadata()
    if not HAS_CUDA and "MEMCOMP_BENCH_RESULTS" not in os.environ:
        return None
    os.makedirs(RESULTS_DIR, exist_ok=True)
    gpu = meta["gpu"].replace(" ", "_").replace("/", "_")
    path = os.path.join(RESULTS_DIR, f"{name}-{gpu}-{meta['date'][:10]}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "ceilings": ceilings(), "rows": rows}, f, indent=2)
    return path


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}  [{metadata()['gpu']}]")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)

