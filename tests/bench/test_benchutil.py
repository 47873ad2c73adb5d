"""The bench runner (bench/benchutil.py): a case times its own baselines, so its speed-ups need no other case;
the command line's counts replace the case's; an implementation that cannot run says why."""

import os
import sys

import pytest
import torch

from memcomp import benchmarking

# bench/ is not installed; its helpers are imported from the checkout (the folder itself, not its parent).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "bench"))
import benchutil  # noqa: E402
from benchutil import BenchCase, Unavailable  # noqa: E402


@pytest.fixture
def clock(monkeypatch):
    """A fake host clock: ``clock.work(ms)`` is a call that lasts ``ms``; ``clock.log`` records what happened."""

    class Clock:
        def __init__(self):
            self.now, self.log = 0.0, []

        def perf_counter(self):
            return self.now

        def work(self, name, ms):
            def run():
                self.log.append(name)
                self.now += ms / 1e3
            return run

    c = Clock()
    monkeypatch.setattr(benchmarking.time, "perf_counter", c.perf_counter)
    return c


def test_speedups_are_computed_inside_the_case(clock):
    rows = []
    case = BenchCase(rows, device="cpu")

    def factory(name, ms):
        def build():
            clock.log.append(f"build {name}")
            return clock.work(name, ms)
        return build

    def missing():
        raise Unavailable("flash-attn not installed")

    results = case.compare({"eager": factory("eager", 4.0), "ours": factory("ours", 1.0), "flash_attn": missing},
                           warmup=1, runs=3, baselines=["eager", "flash_attn"])
    assert list(results) == ["eager", "ours", "flash_attn"]
    assert results["ours"]["speedup_vs_eager"] == pytest.approx(4.0)
    assert results["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert results["ours"]["speedup_vs_flash_attn"] is None  # the baseline did not run: no number, no NaN
    assert results["flash_attn"] == {"unavailable": "flash-attn not installed"}
    assert results["ours"]["runs"] == 3 and results["ours"]["warmup"] == 1
    # Each implementation is built right before it is timed: 1 warm-up + 3 timed calls, then the next.
    assert clock.log == ["build eager", *["eager"] * 4, "build ours", *["ours"] * 4]
    assert rows == []  # rows are the case's to add


def test_out_of_memory_is_a_row_not_a_crash(clock):
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    results = BenchCase([], device="cpu").compare({"eager": lambda: oom, "ours": lambda: clock.work("ours", 1.0)},
                                                  warmup=0, runs=2, baselines=["eager"])
    assert results["eager"] == {"unavailable": "CUDA out of memory"}
    assert results["ours"]["runs"] == 2 and results["ours"]["speedup_vs_eager"] is None


def test_command_line_counts_replace_the_case_counts(clock):
    case = BenchCase([], warmup=0, runs=2, device="cpu")
    assert case.counts(5, 50) == (0, 2)
    (result,) = case.compare({"ours": lambda: clock.work("ours", 1.0)}, warmup=5, runs=50).values()
    assert clock.log == ["ours", "ours"] and result["runs"] == 2 and result["warmup"] == 0
    assert BenchCase([], device="cpu").counts(5, 50) == (5, 50)


def test_bad_use_is_rejected():
    case = BenchCase([], device="cpu")
    with pytest.raises(ValueError, match="no implementations"):
        case.compare({}, warmup=0, runs=1)
    with pytest.raises(ValueError, match="baselines"):
        case.compare({"ours": lambda: (lambda: None)}, warmup=0, runs=1, baselines=["eager"])
    with pytest.raises(ValueError, match="runs override"):
        BenchCase([], runs=0)
    with pytest.raises(ValueError, match="warmup override"):
        BenchCase([], warmup=-1)


def test_table_says_how_it_ran_and_how_many_runs(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = [{"impl": "ours", "median_ms": 2.0, "runs": 3, "speedup_vs_eager": 0.0077},
            {"impl": "flex", "unavailable": "no CPU backward"}]
    benchutil.print_table("packed_attention", rows, ["impl", "median_ms", "speedup_vs_eager"])
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("packed_attention -- ") and "Triton's interpreter" in out[1]
    assert out[2].split() == ["impl", "median_ms", "speedup_vs_eager", "runs", "unavailable"]
    assert "0.0077" in out[3] and out[4].endswith("no CPU backward")
