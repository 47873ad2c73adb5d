"""The bench runner's plumbing: one timer, one comparison per case, hardware ceilings measured in the same run,
metadata and results files.

A bench case is a test function that takes the ``bench`` fixture (a :class:`BenchCase`, bench/conftest.py).
It builds its inputs once and calls ``bench.compare`` with every implementation it reports -- ours and the
baselines it is judged against -- so the baselines are timed inside the case, and a case selected alone
with ``-k`` still reports its speed-ups. ``compare`` times each implementation with
:func:`memcomp.benchmarking.time_fn` (re-exported here; the TTFT suite uses the same timer), with the warm-up
and run counts the case asks for, or the ones given on the command line (``--bench-warmup``,
``--bench-runs``), and every result records the counts that ran.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch

from memcomp.benchmarking import quantile, time_fn
from memcomp.runinfo import run_metadata

__all__ = ["HAS_CUDA", "DEVICE", "RESULTS_DIR", "Unavailable", "BenchCase", "time_fn", "quantile", "MODES",
           "mode_callable", "ceilings", "floor_ms", "per_s", "peak_mb", "metadata", "write_results", "print_table"]

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where results files go. CPU runs write only when it is set: their numbers are smoke-run numbers.
RESULTS_DIR = os.environ.get("MEMCOMP_RESULTS_DIR") or os.path.join(REPO, "bench", "results")


class Unavailable(Exception):
    """Raised by an implementation's factory when it cannot run here (an optional package missing, a backend
    without CPU support): its row gives the reason instead of a time, and the case's other implementations
    still run."""


class BenchCase:
    """One benchmark case: times implementations against each other and records result rows.

    ``rows`` is the bench module's table (printed and written when the module ends). ``warmup`` / ``runs``,
    when given (``--bench-warmup`` / ``--bench-runs``), replace what each case asks for."""

    def __init__(self, rows: list[dict[str, Any]], warmup: Optional[int] = None, runs: Optional[int] = None,
                 device: str = DEVICE):
        if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
            raise ValueError(f"BenchCase: warmup override must be an int >= 0, got {warmup!r}")
        if runs is not None and (isinstance(runs, bool) or not isinstance(runs, int) or runs < 1):
            raise ValueError(f"BenchCase: runs override must be an int >= 1, got {runs!r}")
        self.rows, self.device = rows, device
        self._warmup, self._runs = warmup, runs

    def counts(self, warmup: int, runs: int) -> tuple[int, int]:
        """The counts that will run: the command line's where given, else the case's."""
        return (warmup if self._warmup is None else self._warmup), (runs if self._runs is None else self._runs)

    def time(self, fn: Callable[[], Any], *, warmup: int, runs: int, **kwargs: Any) -> dict[str, Any]:
        """:func:`time_fn` on this case's device with :meth:`counts`; ``kwargs`` go to ``time_fn``."""
        warmup, runs = self.counts(warmup, runs)
        return time_fn(fn, warmup=warmup, runs=runs, device=self.device, **kwargs)

    def compare(self, impls: dict[str, Callable[[], Callable[[], Any]]], *, warmup: int, runs: int,
                baselines: Iterable[str] = (), peak: bool = False, before_peak: Optional[Callable[[], Any]] = None,
                **kwargs: Any) -> dict[str, dict[str, Any]]:
        """Time every implementation in turn, in this case, and the speed-ups over each baseline.

        Args:
            impls: name -> factory. A factory takes no arguments and returns the zero-argument callable to time;
                it runs just before that implementation is timed and its result is dropped right after, so one
                implementation's weights and autograd graph are gone before the next is built. A factory raises
                :class:`Unavailable` for an implementation that cannot run here.
            warmup, runs: the counts the case asks for (see :meth:`counts`).
            baselines: names in ``impls``; each timed row gets ``speedup_vs_<name>`` = that baseline's median /
                its own (None when the baseline is unavailable).
            peak: also measure the peak CUDA memory of one more call above what was allocated before it
                (``peak_MB``; None on a CPU).
            before_peak: called before that call, e.g. to drop buffers an implementation keeps between calls,
                so that they count in its peak.
            kwargs: passed to :func:`time_fn` (``flush_l2``, ``sync_each``).

        Returns:
            name -> the :func:`time_fn` result (plus ``peak_MB`` and the speed-ups), or ``{"unavailable": reason}``
            (the factory's reason, or "CUDA out of memory"), in the order of ``impls``.

        Raises:
            ValueError: no implementations, or a baseline that is not one of them.
        """
        baselines = list(baselines)
        if not impls:
            raise ValueError("BenchCase.compare: no implementations to time")
        unknown = [b for b in baselines if b not in impls]
        if unknown:
            raise ValueError(f"BenchCase.compare: baselines {unknown} are not among the implementations "
                             f"{list(impls)}")
        results: dict[str, dict[str, Any]] = {}
        for name, factory in impls.items():
            try:
                fn = factory()
            except Unavailable as exc:
                results[name] = {"unavailable": str(exc)}
                continue
            try:
                result = self.time(fn, warmup=warmup, runs=runs, **kwargs)
                if peak:
                    if before_peak is not None:
                        before_peak()
                    result["peak_MB"] = peak_mb(fn)
            except torch.cuda.OutOfMemoryError:
                # A result at this shape, not a crash of the case: the row says so and the others still run.
                result = {"unavailable": "CUDA out of memory"}
            results[name] = result
            # Models hold reference cycles: collect now, so this implementation's memory is gone before the
            # next one is built and its peak is taken.
            del fn
            gc.collect()
            if HAS_CUDA:
                torch.cuda.empty_cache()
        for base in baselines:
            base_ms = results[base].get("median_ms")
            for result in results.values():
                if "median_ms" in result:
                    result[f"speedup_vs_{base}"] = base_ms / result["median_ms"] if base_ms is not None else None
        return results

    def add(self, row: dict[str, Any]) -> None:
        """Append one result row to the bench's table."""
        self.rows.append(row)


MODES = ("fwd", "bwd", "fwd+bwd")


def mode_callable(mode: str, forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor],
                  grad_out: torch.Tensor) -> Callable[[], Any]:
    """The callable to time for one pass of ``forward()``: ``"fwd"`` runs it without autograd; ``"bwd"`` runs
    it once here and times only the gradients with respect to ``inputs`` (the graph is retained between
    calls); ``"fwd+bwd"`` times both. ``grad_out`` has the shape of ``forward()``'s output.
    Raises ``ValueError`` for another mode."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward()
    elif mode == "bwd":
        out = forward()

        def run():
            return torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    elif mode == "fwd+bwd":
        def run():
            return torch.autograd.grad(forward(), inputs, grad_out)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return run


def per_s(amount: float, result: dict[str, Any]) -> Optional[float]:
    """``amount`` per second at the result's median time; None for an implementation that did not run."""
    return amount / (result["median_ms"] * 1e-3) if "median_ms" in result else None


@functools.lru_cache(maxsize=1)
def ceilings() -> dict[str, float]:
    """Measured on this device now: copy bandwidth (read + write bytes, GB/s) and a large bf16 GEMM rate
    (TFLOP/s). NaN without CUDA (results files then record no ceilings)."""
    if not HAS_CUDA:
        return {"bandwidth_gbs": float("nan"), "gemm_tflops": float("nan")}
    bw = _copy_bandwidth_gbs()
    tflops = _gemm_tflops()
    torch.cuda.empty_cache()
    return {"bandwidth_gbs": bw, "gemm_tflops": tflops}


def _copy_bandwidth_gbs() -> float:
    x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()  # 1 GiB, far beyond L2
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), warmup=5, runs=50, device="cuda")["median_ms"]
    return 2 * x.numel() * x.element_size() / (t * 1e-3) / 1e9


def _gemm_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    t = time_fn(lambda: a @ b, warmup=5, runs=30, device="cuda")["median_ms"]
    return 2 * n**3 / (t * 1e-3) / 1e12


def floor_ms(bytes_moved: float, flops: float) -> Optional[float]:
    """The op's floor in ms: the larger of its bytes at the measured copy bandwidth and its FLOPs at the
    measured GEMM rate. None without CUDA (no ceilings to divide by)."""
    if not HAS_CUDA:
        return None
    c = ceilings()
    return max(bytes_moved / (c["bandwidth_gbs"] * 1e9), flops / (c["gemm_tflops"] * 1e12)) * 1e3


def metadata() -> dict[str, Any]:
    return run_metadata(DEVICE)


def peak_mb(fn: Callable[[], Any]) -> Optional[float]:
    """Peak CUDA memory of one more call of ``fn`` above what was allocated before it. None on a CPU, without
    calling ``fn`` (there is no allocator peak to read)."""
    if not HAS_CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def write_results(name: str, rows: list[dict[str, Any]]) -> Optional[str]:
    """``<results dir>/<name>-<gpu>-<UTC timestamp>.json`` with the metadata, the ceilings and every row (every
    timed run included). Written on a GPU, or on a CPU when ``MEMCOMP_RESULTS_DIR`` is set; else None."""
    if not HAS_CUDA and not os.environ.get("MEMCOMP_RESULTS_DIR"):
        return None
    meta = metadata()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    gpu = re.sub(r"[^A-Za-z0-9.-]+", "_", meta["gpu"]).strip("_")  # "NVIDIA H200" -> NVIDIA_H200
    # The timestamp, not just the date: two runs of one bench on one day (different -k selections) keep both.
    stamp = meta["date"][:19].replace("-", "").replace(":", "")
    path = os.path.join(RESULTS_DIR, f"{name}-{gpu}-{stamp}Z.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "ceilings": ceilings() if HAS_CUDA else None, "rows": rows}, f, indent=2)
    return path


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print ``rows`` under a title line that says how the run executed (:func:`memcomp.runinfo.run_mode`).
    The ``runs`` column and, when a row has one, the ``unavailable`` reason are always shown."""
    columns = list(columns)
    for extra in ("runs", "unavailable"):
        if extra not in columns and any(extra in r for r in rows):
            columns.append(extra)
    print(f"\n{title} -- {metadata()['mode']}")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
