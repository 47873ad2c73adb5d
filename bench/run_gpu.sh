#!/usr/bin/env bash
# Everything a lent GPU should run, in one call:   bash bench/run_gpu.sh [all|tests|bench|ttft]
# (stages, so one session can split the work across calls if a 10-minute call is tight).
# Results: bench/results/*.json|md|png (GPU, versions, commit, date) and, when $OUT is set (the device
# tool's output folder), copies of them plus the logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
OUT=${OUT:-bench/results}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
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
if [ "$stage" = all ] || [ "$stage" = tests ]; then
  python -m pytest tests -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  python -m pytest bench --benchmark -k "not ttft" -q -p no:cacheprovider \
    --benchmark-json="$OUT/pytest_benchmark.json" 2>&1 | tee "$OUT/bench.log" | grep -vE "^\s*$" | tail -60
fi
if [ "$stage" = all ] || [ "$stage" = ttft ]; then
  # The paper's protocol is 3 warm-ups and 20 runs (the CLI default); 2 and 5 keep this call in budget.
  python -m memcomp bench ttft --model-config qwen2.5-7b --lengths 4k,8k,16k,32k,64k,120k --warmup 2 --runs 5 \
    --out bench/results 2>&1 | tee "$OUT/ttft.log" | tail -14
fi
cp bench/results/* "$OUT/" 2>/dev/null || true
