#!/usr/bin/env bash
# Everything a lent GPU should run, in one call:   bash bench/run_gpu.sh [all|tests|bench|ttft]
# (stages, so one session can split the work across calls if a 10-minute call is tight).
# Results (*.json|md|png with GPU, versions, commit, date) and logs go to $OUT when it is set (the device tool's
# output folder: a call stopped at its time limit still returns what finished), else to bench/results/.
# Next GPU session:  bash bench/fetch_wheels.sh  here, then run `bash bench/run_gpu.sh tests` (and `bench`,
# `ttft`) with carry [".whl"]; copy the files back into bench/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
OUT=${OUT:-bench/results}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
# Results go straight to $OUT, so a call stopped at its time limit still returns what finished.
export MEMCOMP_BENCH_RESULTS="$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
# Carried wheels (bash bench/fetch_wheels.sh here, then carry [".whl"]): installed beside the image's packages.
if ls .whl/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# A bare machine has torch, triton and transformers; never reinstall torch. Install memcomp itself without
# dependencies; benches and tests that need a missing optional package (bitsandbytes, peft, flash-attn,
# liger-kernel, deepspeed) skip with a reason.
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
python - <<'PY' | tee "$OUT/packages.txt"
import importlib
for name in ("torch", "triton", "transformers", "safetensors", "tqdm", "pytest", "pytest_benchmark", "matplotlib",
             "bitsandbytes", "peft", "liger_kernel", "flash_attn", "deepspeed"):
    try:
        m = importlib.import_module(name); print(f"{name:18} {getattr(m, '__version__', 'installed')}")
    except Exception as e:
        print(f"{name:18} MISSING ({type(e).__name__})")
PY
python -c "import pytest, pytest_benchmark" 2>/dev/null || { echo "pytest/pytest-benchmark missing: carry wheels"; exit 1; }
# One hung or runaway test must not eat the whole call: per-test limits when pytest-timeout is there (it is in
# the GPU image).
T_TEST=""; T_BENCH=""
if python -c "import pytest_timeout" 2>/dev/null; then T_TEST="--timeout=180"; T_BENCH="--timeout=300"; fi
if [ "$stage" = all ] || [ "$stage" = tests ]; then
  python -m pytest tests -m gpu -q -rs -p no:cacheprovider $T_TEST 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  python -m pytest bench --benchmark -k "not ttft" -q -rs -p no:cacheprovider $T_BENCH \
    --benchmark-json="$OUT/pytest_benchmark.json" 2>&1 | tee "$OUT/bench.log" | grep -vE "^\s*$" | tail -60
fi
if [ "$stage" = all ] || [ "$stage" = ttft ]; then
  # The paper's protocol is 3 warm-ups and 20 runs (the CLI default); 2 and 5 keep this call in budget.
  python -m memcomp bench ttft --model-config qwen2.5-7b --lengths 4k,8k,16k,32k,64k,120k --warmup 2 --runs 5 \
    --out "$OUT" 2>&1 | tee "$OUT/ttft.log" | tail -14
fi
# (Copy the results from $OUT into bench/results/ of the checkout and commit them.)
