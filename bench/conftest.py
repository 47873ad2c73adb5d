"""`pytest bench/ --benchmark` runs the microbenchmarks; without --benchmark every bench is skipped, so a
plain `pytest` stays fast. On a CPU the same code runs tiny smoke shapes (Triton in its interpreter)."""

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
    parser.addoption("--benchmark", action="store_true", default=False, help="run memcomp's benchmarks")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run with `pytest bench/ --benchmark`")
    for item in items:
        if "bench" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def recorder(request):
    """Collects result rows of one bench module; prints a table and writes bench/results/ at the end."""
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
