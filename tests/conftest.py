"""Test set-up shared by every tier.

Without CUDA, the Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set before triton
is first imported, which is why this happens at the top of the root conftest. The interpreter computes
bf16 wrongly, so CPU tests use fp32/fp16 and bf16 tests are GPU-only.
"""

import os

import torch

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
