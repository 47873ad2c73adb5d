"""Test set-up shared by every tier.

Without CUDA, the Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set before triton
is first imported, which is why this happens at the top of the root conftest. The interpreter computes
bf16 wrongly, so CPU tests use fp32/fp16 and bf16 tests are GPU-only.
"""

import os
import sys

import torch

# Test helpers live in tests/_support (imported as `testutil`). Only that folder goes on sys.path: with
# --import-mode=importlib the test folders themselves never do, so tests/memcomp and tests/kernels cannot
# shadow the installed memcomp or look like Hugging Face's `kernels` package to transformers.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_support"))
# `python -m pytest` (bench/run_gpu.sh, many users) also puts the working directory on sys.path; from the
# checkout that exposes kernels/ and trainers/ under generic names. The suite tests the installed package.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != os.path.realpath(_CHECKOUT)]

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def close_to_oracle():
    from testutil import assert_close_to_oracle

    return assert_close_to_oracle


@pytest.fixture(scope="session")
def base_tokenizer():
    """A small BPE tokenizer trained on testutil.TEXTS (nothing downloaded)."""
    from testutil import TEXTS

    from memcomp.demo.tokenizer import train_tokenizer

    return train_tokenizer(TEXTS * 4, vocab_size=320)
