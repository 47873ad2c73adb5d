#!/usr/bin/env bash
# Set-up on a fresh machine: everything the demo and the tests need, idempotent and quiet when done.
# - No torch yet: install torch==2.13.0 (a CPU build on these CPU machines, no CUDA wheels pulled).
#   A torch already there (the user's CUDA build on a GPU machine) is kept.
# - memcomp itself, editable, with the dev extra (pytest, pytest-benchmark, matplotlib, ruff).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "memcomp setup: installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c "import memcomp, pytest, pytest_benchmark, matplotlib, triton, transformers, liger_kernel" >/dev/null 2>&1 \
   || [ pyproject.toml -nt "$("$PY" -c 'import memcomp,os;print(os.path.dirname(memcomp.__file__))' 2>/dev/null || echo /nonexistent)" ]; then
  echo "memcomp setup: pip install -e .[dev]"
  "$PY" -m pip install -q -e ".[dev]"
fi
