#!/usr/bin/env bash
# Everything a lent GPU should run, in one call: the GPU test tier, then every benchmark.
# Results: bench/results/*.json (with GPU, versions, commit, date) and, when $OUT is set (the device
# tool's output folder), copies of them plus the logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT" bench/results
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# Bare machine: torch/triton/transformers are expected there; install only what is missing, never torch.
python -c "import pytest, pytest_benchmark" 2>/dev/null || python -m pip install -q pytest pytest-benchmark
python -m pip install -q --no-deps -e . 2>&1 | tail -1
python -c "import safetensors, tqdm" 2>/dev/null || python -m pip install -q safetensors tqdm
python -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
python -m pytest bench --benchmark -q -p no:cacheprovider --benchmark-json="$OUT/pytest_benchmark.json" \
  2>&1 | tee "$OUT/bench.log" | grep -vE "^\s*$" | tail -40
cp bench/results/*.json "$OUT/" 2>/dev/null || true
