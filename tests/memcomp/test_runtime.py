"""The thread count: an explicit request, then OMP_NUM_THREADS, then free cores."""

import os

import pytest

from memcomp import runtime


def test_explicit_request_then_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.choose_threads(5) == (5, "threads= option")
    assert runtime.choose_threads(0) == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='two'"):
        runtime.choose_threads(0)
    with pytest.raises(ValueError, match=">= 0"):
        runtime.choose_threads(-1)


@pytest.mark.parametrize("busy,want", [(0.0, 4), (1.2, 3), (3.6, 1), (9.0, 1)])
def test_automatic_choice_leaves_busy_cores_alone(monkeypatch, busy, want):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)
    monkeypatch.setattr(runtime, "busy_cores", lambda: busy)
    n, why = runtime.choose_threads(0)
    assert n == want and f"{busy:.1f} busy" in why


def test_busy_cores_reads_the_machine_now():
    busy = runtime.busy_cores(0.2)
    if busy is None:
        pytest.skip("/proc/stat is not readable here")
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6
