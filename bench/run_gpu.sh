#!/usr/bin/env bash
# What a lent GPU should run:   bash bench/run_gpu.sh [all|tests|bench|ttft|ttft32] [-k expression for bench]
#
# `all` (the default) runs the GPU test tier, the TTFT suite and the microbenchmarks in one device call and
# ends inside a time budget (MEMCOMP_GPU_BUDGET_S, default 540 s, under the device tool's 600 s): each stage
# gets a share, is interrupted (SIGINT, so reports are still written) when it runs over, and says what it cut.
# Results are written as they finish, so a cut stage keeps what it measured. For complete coverage give the
# stages their own calls, e.g. bench split by -k:
#   MEMCOMP_COMMIT=<sha> bash bench/run_gpu.sh tests
#   MEMCOMP_COMMIT=<sha> bash bench/run_gpu.sh ttft
#   MEMCOMP_COMMIT=<sha> bash bench/run_gpu.sh bench "segment or encode or packed_attention or cross_entropy"
#   MEMCOMP_COMMIT=<sha> bash bench/run_gpu.sh bench "nf4 or train_step"
#   MEMCOMP_COMMIT=<sha> bash bench/run_gpu.sh ttft32     # Qwen2.5-32B where memory allows (OOM is recorded)
# Before the first call, here: `bash bench/fetch_wheels.sh` (bitsandbytes, liger-kernel) and carry [".whl"].
# Results (*.json|md|png with GPU, versions, commit, date) and logs go to $OUT when it is set (the device tool's
# output folder: a call stopped at its limit still returns what finished), else to bench/results/. Copy them
# into bench/results/ of the checkout and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
select=${2:-}
case "$stage" in all|tests|bench|ttft|ttft32) ;;
  *) echo "usage: bash bench/run_gpu.sh [all|tests|bench|ttft|ttft32] [-k expr]"; exit 2;; esac
OUT=${OUT:-bench/results}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
export MEMCOMP_BENCH_RESULTS="$OUT"
DEADLINE=$(( $(date +%s) + ${MEMCOMP_GPU_BUDGET_S:-540} ))
STATUS=0   # the script's exit status: the first failing stage's (a stage cut by the budget counts as failing)

# run_stage NAME SHARE_S CMD...: at most SHARE_S seconds and never past the deadline. Its output goes through
# a pipe to a log, so the status travels in a file rather than through the pipeline.
run_stage() {
  local name=$1 share=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  [ "$stage" = all ] || share=$left
  [ "$share" -gt "$left" ] && share=$left
  if [ "$share" -lt 20 ]; then echo "== $name: skipped, the time budget is spent"; echo 124 > "$OUT/.rc"; return; fi
  echo "== $name (up to ${share} s)"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=20 "$share" "$@"
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "== $name: CUT at ${share} s (time budget); what it finished is written"; fi
  echo "== $name: $(( $(date +%s) - t0 )) s, exit $rc"
  echo $rc > "$OUT/.rc"
}
stage_done() { local rc; rc=$(cat "$OUT/.rc" 2>/dev/null || echo 1); rm -f "$OUT/.rc"; [ "$STATUS" -ne 0 ] || STATUS=$rc; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
# Carried wheels (bench/fetch_wheels.sh), installed beside the image's packages. Never reinstall torch.
if ls .whl/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# memcomp itself without dependencies; tests and benches that need a missing optional package skip with a reason.
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python -c "import memcomp.kernels, memcomp.fused" || { echo "memcomp did not install: stopping"; exit 1; }
[ -n "${MEMCOMP_COMMIT:-}" ] || [ -d .git ] || echo "warning: no .git and no MEMCOMP_COMMIT: results say commit unknown"
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
# Per-test limits as well, when pytest-timeout is there (it is in the GPU image).
T_TEST=""; T_BENCH=""
if python -c "import pytest_timeout" 2>/dev/null; then T_TEST="--timeout=180"; T_BENCH="--timeout=240"; fi

if [ "$stage" = all ] || [ "$stage" = tests ]; then
  run_stage "GPU tests" 120 python -m pytest tests -m gpu -q -rs -p no:cacheprovider $T_TEST 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -15
  stage_done
fi
if [ "$stage" = all ] || [ "$stage" = ttft ]; then
  # The paper's protocol is 3 warm-ups and 20 runs (the CLI default); in `all`, 2 and 5.
  runs="--warmup 3 --runs 20"; [ "$stage" = all ] && runs="--warmup 2 --runs 5"
  run_stage "TTFT" 200 python -m memcomp bench ttft --model-config qwen2.5-7b --lengths 4k,8k,16k,32k,64k,120k \
    $runs --out "$OUT" 2>&1 | tee "$OUT/ttft.log" | tail -14
  stage_done
fi
if [ "$stage" = ttft32 ]; then
  # 64 GB of bf16 weights: the full-context prefill at 120K may not fit beside its KV cache and activations.
  run_stage "TTFT 32B" 0 python -m memcomp bench ttft --model-config qwen2.5-32b --lengths 4k,16k,32k,64k,120k \
    --warmup 1 --runs 3 --out "$OUT" 2>&1 | tee "$OUT/ttft32.log" | tail -14
  stage_done
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  expr="not ttft"; [ -n "$select" ] && expr="($select) and not ttft"
  run_stage "benchmarks" 600 python -m pytest bench --benchmark -k "$expr" -q -rs -p no:cacheprovider $T_BENCH \
    --benchmark-json="$OUT/pytest_benchmark.json" 2>&1 | tee "$OUT/bench.log" | grep -vE "^\s*$" | tail -60
  stage_done
fi
echo "== run_gpu.sh: exit $STATUS"
exit "$STATUS"
