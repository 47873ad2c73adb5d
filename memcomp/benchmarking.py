"""The timer of memcomp's benchmarks (``bench/``) and of the TTFT suite (``memcomp.ttft``): counted runs.

    from memcomp.benchmarking import time_fn
    t = time_fn(step, warmup=3, runs=20, device="cuda")   # t["median_ms"], t["p20_ms"], t["p80_ms"], ...

``fn`` is called ``warmup`` times untimed, then exactly ``runs`` times timed. On a CUDA device each timed
call is bracketed by a pair of CUDA events on the current stream (device time, as
``triton.testing.do_bench`` measures it), and the host waits once, after the last call; before each call
the L2 cache is overwritten (``flush_l2``), as do_bench does, so that a kernel does not find its inputs
left in L2 by the previous call -- a decode-shape weight of a few MB would otherwise be read at L2 rather
than HBM bandwidth. On a CPU each call is timed with the host clock.

Why not ``triton.testing.do_bench`` itself: its ``warmup`` and ``rep`` are target durations in milliseconds,
and the number of calls follows from an estimate over five calls: at its default ``rep`` of 100 ms a
one-second training step gets one timed run, and its p20/p80 are that one time. Here the counts are what
runs, and the result says how many runs its quantiles come from.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

from memcomp.runinfo import check_device

__all__ = ["time_fn", "quantile"]

# Overwriting twice the L2 evicts what the previous call left there; when the device does not report its L2
# size, 256 MiB (do_bench's buffer) is above every current GPU's L2.
_FALLBACK_FLUSH_BYTES = 256 * 2**20


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by linear interpolation between order statistics (the definition of
    ``numpy.quantile`` and of ``torch.quantile``, which do_bench uses): for any data
    ``min <= p20 <= median <= p80 <= max``, and one value is its own quantile at every q.

    Raises ``ValueError`` for no values or a ``q`` outside [0, 1]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"time_fn: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _cuda_times(fn: Callable[[], Any], warmup: int, runs: int, dev: torch.device, flush_l2: bool,
                sync_each: bool) -> list[float]:
    with torch.cuda.device(dev):
        for _ in range(warmup):
            fn()
        flush = None
        if flush_l2:
            l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)
            flush = torch.empty(2 * l2 if l2 > 0 else _FALLBACK_FLUSH_BYTES, dtype=torch.int8, device=dev)
        torch.cuda.synchronize(dev)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for start, end in zip(starts, ends):
            if flush is not None:
                flush.zero_()  # outside the events: the flush is not timed
            start.record()
            fn()
            end.record()
            if sync_each:
                end.synchronize()
        # Without sync_each, one wait at the end: the host queues the next call while the device runs this one,
        # so host launch overhead hides behind device work, as it does in a training loop.
        torch.cuda.synchronize(dev)
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def _host_times(fn: Callable[[], Any], warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_fn(fn: Callable[[], Any], *, warmup: int, runs: int, device: Union[str, torch.device],
            flush_l2: bool = True, sync_each: bool = False) -> dict[str, Any]:
    """Time ``fn()``: ``warmup`` untimed calls, then exactly ``runs`` timed calls.

    Args:
        fn: a callable without arguments; what it returns is discarded.
        warmup: untimed calls first (compilation, autotuning, allocator warm-up), an int >= 0.
        runs: timed calls, an int >= 1.
        device: where ``fn`` runs: ``"cpu"`` (host clock) or ``"cuda"`` / ``"cuda:N"`` (CUDA events on that
            device's current stream; ``"cuda"`` is the current device).
        flush_l2: on CUDA, overwrite twice the L2 cache before each timed call, outside the timed interval.
            Has no effect on a CPU (host-clock numbers are smoke-run numbers, not cache studies).
        sync_each: on CUDA, wait for each timed call to finish before starting the next, so a call starts on an
            idle device and its interval includes the host's launch work (a latency, e.g. time to first token).
            Off (the default, as in do_bench), calls are queued back to back: where the host launches faster than
            the device runs, an interval is the call's device time alone.

    Returns:
        ``{"median_ms", "p20_ms", "p80_ms", "mean_ms"}`` (floats, milliseconds; quantiles as in
        :func:`quantile`), ``"runs"`` and ``"warmup"`` (the counts that ran), ``"clock"`` (``"cuda events"``
        or ``"host clock"``) and ``"runs_ms"`` (every timed call, in call order).

    Raises:
        TypeError: ``fn`` is not callable.
        ValueError: a count that is not an int in range, a device that is not CPU or CUDA or a CUDA index that
            does not exist (:func:`memcomp.runinfo.check_device`).
        RuntimeError: a CUDA device requested without CUDA.
        Whatever ``fn`` raises, unchanged (e.g. ``torch.cuda.OutOfMemoryError``).
    """
    if not callable(fn):
        raise TypeError(f"time_fn: fn must be callable, got {type(fn).__name__}")
    warmup = _check_count("warmup", warmup, 0)
    runs = _check_count("runs", runs, 1)
    dev = check_device(device)
    if dev.type == "cuda":
        times, clock = _cuda_times(fn, warmup, runs, dev, flush_l2, sync_each), "cuda events"
    else:
        times, clock = _host_times(fn, warmup, runs), "host clock"
    return {"median_ms": quantile(times, 0.5), "p20_ms": quantile(times, 0.2), "p80_ms": quantile(times, 0.8),
            "mean_ms": statistics.fmean(times), "runs": runs, "warmup": warmup, "clock": clock, "runs_ms": times}
