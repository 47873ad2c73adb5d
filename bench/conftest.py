"""`pytest bench/ --benchmark` runs the benchmarks; without --benchmark every bench is skipped, so a plain
`pytest` stays fast. `--bench-warmup N` / `--bench-runs N` replace the counts every case asks for. On a CPU the
same code runs tiny smoke shapes, with the Triton kernels in Triton's interpreter, and every table says so."""

import os
import sys

import torch

# Benchmark helpers (benchutil) sit beside this file; the suite runs with --import-mode=importlib.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# `python -m pytest` from the checkout puts it on sys.path too, exposing kernels/ and trainers/ under generic
# names (transformers probes for a `kernels` package); benchmarks run the installed memcomp.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != os.path.realpath(_CHECKOUT)]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("memcomp benchmarks")
    group.addoption("--benchmark", action="store_true", default=False, help="run memcomp's benchmarks")
    group.addoption("--bench-warmup", type=int, default=None, metavar="N",
                    help="untimed calls before timing, for every implementation of every case (default: each "
                         "case's own)")
    group.addoption("--bench-runs", type=int, default=None, metavar="N",
                    help="timed calls per implementation of every case (default: each case's own)")


def pytest_configure(config):
    warmup, runs = config.getoption("--bench-warmup"), config.getoption("--bench-runs")
    if warmup is not None and warmup < 0:
        raise pytest.UsageError(f"--bench-warmup must be >= 0, got {warmup}")
    if runs is not None and runs < 1:
        raise pytest.UsageError(f"--bench-runs must be >= 1, got {runs}")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    # The hook sees every collected item (`pytest bench tests` collects both): skip only the files of this folder.
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="benchmarks run with `pytest bench/ --benchmark`")
    for item in items:
        if os.path.dirname(os.path.abspath(str(item.path))) == here:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def _bench_rows(request):
    """The result rows of one bench module; printed as one table, and written to the results folder, at its end."""
    rows: list[dict] = []
    yield rows
    from benchutil import print_table, write_results

    if rows:
        name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("bench_")
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print_table(name, rows, request.module.COLUMNS)
            path = write_results(name, rows)
            if path:
                print(f"wrote {path}")


@pytest.fixture
def bench(request, _bench_rows):
    """A :class:`benchutil.BenchCase` for this case: times implementations against each other, with the counts
    the case asks for or --bench-warmup / --bench-runs, and appends rows to the module's table."""
    from benchutil import BenchCase

    return BenchCase(_bench_rows, warmup=request.config.getoption("--bench-warmup"),
                     runs=request.config.getoption("--bench-runs"))
