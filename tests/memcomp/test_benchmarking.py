"""The benchmarks' and the TTFT suite's timer: the requested counts are what runs, and the quantiles are the
documented ones (linear interpolation, as numpy and torch.quantile define them)."""

import pytest
import torch

from memcomp import benchmarking
from memcomp.benchmarking import quantile, time_fn


class _Clock:
    """Stands in for time.perf_counter: each timed call of ``work`` lasts the next of ``durations_ms``."""

    def __init__(self, durations_ms):
        self.durations = list(durations_ms)
        self.now = 0.0
        self.calls = 0

    def perf_counter(self):
        return self.now

    def work(self):
        self.calls += 1
        if self.durations:
            self.now += self.durations.pop(0) / 1e3


def test_counts_are_what_runs_and_quantiles_are_linear(monkeypatch):
    # Two warm-up calls (1000 ms each: they must not reach the statistics), then five timed ones.
    clock = _Clock([1000.0, 1000.0, 5.0, 1.0, 4.0, 2.0, 3.0])
    monkeypatch.setattr(benchmarking.time, "perf_counter", clock.perf_counter)
    t = time_fn(clock.work, warmup=2, runs=5, device="cpu")
    assert clock.calls == 7
    assert t["runs"] == 5 and t["warmup"] == 2 and t["clock"] == "host clock"
    assert t["runs_ms"] == pytest.approx([5.0, 1.0, 4.0, 2.0, 3.0])  # call order
    # Sorted 1..5: p20 at position 0.8 -> 1.8, median 3, p80 at position 3.2 -> 4.2.
    assert (t["p20_ms"], t["median_ms"], t["p80_ms"], t["mean_ms"]) == pytest.approx((1.8, 3.0, 4.2, 3.0))


@pytest.mark.parametrize("warmup,runs", [(0, 1), (3, 2), (1, 20)])
def test_real_clock_counts_and_order(warmup, runs):
    calls = []
    t = time_fn(lambda: calls.append(sum(range(2000))), warmup=warmup, runs=runs, device="cpu")
    assert len(calls) == warmup + runs
    assert t["runs"] == runs == len(t["runs_ms"]) and t["warmup"] == warmup
    assert min(t["runs_ms"]) <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] <= max(t["runs_ms"])


def test_quantile_matches_torch_quantile():
    values = torch.rand(37, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert quantile(values.tolist(), q) == pytest.approx(torch.quantile(values, q).item(), rel=1e-12)
    assert quantile([7.0], 0.2) == quantile([7.0], 0.8) == 7.0
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0  # order of the input does not matter
    with pytest.raises(ValueError, match="no values"):
        quantile([], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quantile([1.0], 1.5)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"warmup": -1, "runs": 1}, ValueError, "warmup"),
    ({"warmup": 0, "runs": 0}, ValueError, "runs"),
    ({"warmup": 0, "runs": 2.0}, ValueError, "runs"),
    ({"warmup": True, "runs": 1}, ValueError, "warmup"),
    ({"warmup": 0, "runs": 1, "device": "meta"}, ValueError, "cpu"),
    ({"warmup": 0, "runs": 1, "device": "nonsense"}, ValueError, "cpu"),
])
def test_bad_arguments_are_rejected_before_anything_runs(kwargs, error, match):
    calls = []
    with pytest.raises(error, match=match):
        time_fn(lambda: calls.append(1), **{"device": "cpu", **kwargs})
    assert calls == []


def test_not_callable_and_cuda_without_cuda():
    with pytest.raises(TypeError, match="callable"):
        time_fn(42, warmup=0, runs=1, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            time_fn(lambda: None, warmup=0, runs=1, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("sync_each", [False, True])
def test_cuda_events_time_device_work(sync_each):
    """torch.cuda._sleep spins the GPU for a number of cycles: device time the host clock would not see when
    the calls are queued back to back."""
    calls = []

    def fn():
        calls.append(1)
        torch.cuda._sleep(2_000_000)  # ~1 ms at 2 GHz

    t = time_fn(fn, warmup=2, runs=7, device="cuda", sync_each=sync_each)
    assert len(calls) == 9 and t["runs"] == 7 == len(t["runs_ms"]) and t["clock"] == "cuda events"
    assert min(t["runs_ms"]) <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] <= max(t["runs_ms"])
    assert t["median_ms"] > 0.2  # the spin, not the launch alone
    with pytest.raises(ValueError, match="does not exist"):
        time_fn(fn, warmup=0, runs=1, device=f"cuda:{torch.cuda.device_count()}")
