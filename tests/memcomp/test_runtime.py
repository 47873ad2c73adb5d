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


@pytest.mark.parametrize("load,want", [(0.0, 4), (1.2, 3), (3.6, 1), (9.0, 1)])
def test_automatic_choice_leaves_busy_cores_alone(monkeypatch, load, want):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    n, why = runtime.choose_threads(0)
    assert n == want and f"load {load:.1f}" in why
