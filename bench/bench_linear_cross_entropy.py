"""The training loss at Qwen2.5-7B's vocabulary (152,064), d = 3,584, bf16, 8,192 tokens with 25 % targets:
target-only fused linear cross-entropy (gather the target rows, then liger-kernel's fused kernel; and our
chunked PyTorch version) against liger-kernel's fused linear cross-entropy over all rows, and eager
(full logits + F.cross_entropy with ignore_index). Forward + backward time and peak memory.
Target (H200): >= 2x liger over all rows with no more peak memory. On a CPU: small smoke shapes."""

import importlib.util

import torch
import torch.nn.functional as F
from benchutil import DEVICE, HAS_CUDA, Unavailable

from memcomp.fused import linear_cross_entropy

COLUMNS = ["impl", "tokens", "targets", "median_ms", "p20_ms", "p80_ms", "peak_MB", "speedup_vs_liger_all_rows",
           "speedup_vs_eager"]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
T, V, D = (8192, 152064, 3584) if HAS_CUDA else (256, 1000, 64)
WARMUP, RUNS = (3, 20) if HAS_CUDA else (1, 3)


def _need_liger():
    if importlib.util.find_spec("liger_kernel") is None:
        raise Unavailable("liger-kernel not installed (pip install liger-kernel)")


def test_loss(bench):
    """Forward + backward of the loss: ours (target rows only) against liger over all rows and eager."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(T, D, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_()
    W = (torch.randn(V, D, device=DEVICE, dtype=DTYPE, generator=g) / D**0.5).requires_grad_()
    labels = torch.full((T,), -100, device=DEVICE)
    rows = torch.randperm(T, device=DEVICE, generator=g)[: T // 4].sort().values
    labels[rows] = torch.randint(0, V, (rows.numel(),), device=DEVICE, generator=g)

    def backward(loss):
        loss.backward()
        hidden.grad = W.grad = None

    def eager():
        return lambda: backward(F.cross_entropy((hidden @ W.t()).float(), labels, ignore_index=-100))

    def liger_all_rows():
        _need_liger()
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")  # its public module, by keyword
        return lambda: backward(loss_fn(lin_weight=W, _input=hidden, target=labels))

    def ours(impl):
        if impl == "liger":
            _need_liger()
        return lambda: backward(linear_cross_entropy(hidden[rows], W, labels[rows], impl=impl).mean())

    results = bench.compare({"liger_all_rows": liger_all_rows, "eager": eager,
                             "ours_chunked": lambda: ours("chunked"), "ours_liger": lambda: ours("liger")},
                            warmup=WARMUP, runs=RUNS, baselines=["liger_all_rows", "eager"], peak=True)
    for impl, r in results.items():
        bench.add({"impl": impl, "tokens": T, "targets": rows.numel(), **r})
