#!/usr/bin/env bash
# Set-up on a fresh machine: everything the demo and the tests need. Safe to re-run.
# - No torch yet: install torch==2.13.0 (a CPU build on these CPU machines, no CUDA wheels pulled).
#   A torch already there (the user's CUDA build on a GPU machine) is kept.
# - memcomp from THIS checkout, editable, with the dev extra (pytest, pytest-benchmark, matplotlib,
#   ruff). Always re-run: a memcomp installed from another checkout must not be the one tested.
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
