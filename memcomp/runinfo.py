"""What a measurement ran on: device and how the kernels ran, library versions, git commit, date. Recorded with
every benchmark and TTFT result, so a number is never read without the machine and code it came from."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any, Union

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """Short commit of the checkout memcomp runs from, with ``-dirty`` when tracked files have uncommitted changes.

    Where git cannot tell (an exported copy of the tree without ``.git``, or no git installed), the commit named
    by ``$MEMCOMP_COMMIT``, else ``"unknown"``. Git wins over the variable when both exist, so a stale variable
    cannot mislabel a checkout."""
    fallback = os.environ.get("MEMCOMP_COMMIT") or "unknown"
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=_REPO, capture_output=True, text=True,
                                        timeout=10).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        if not commit:
            return fallback
        return commit + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def check_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a ``torch.device`` with its index filled in for CUDA. Raises ``ValueError`` for anything but
    ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` with an existing N, ``RuntimeError`` for CUDA without CUDA."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return dev


def run_mode(device: Union[str, torch.device]) -> str:
    """One line saying how a run on ``device`` executes memcomp's kernels, printed above every results table.

    On a CPU the Triton kernels run, where a case forces them, in Triton's interpreter (``TRITON_INTERPRET=1``),
    which executes each program one after another in Python: thousands of times slower than the compiled
    kernel, so a CPU "speed-up" of 0.008 is not a regression -- CPU numbers check that every case runs, not
    how fast. Raises as :func:`check_device` does."""
    dev = check_device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"GPU: {torch.cuda.get_device_name(dev)} (sm_{major}{minor}), Triton kernels compiled"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return ("CPU smoke run: Triton kernels, where a case runs them, run in Triton's interpreter; times and "
                "speed-ups say nothing about GPU performance")
    return ("CPU smoke run: without TRITON_INTERPRET=1 only the eager PyTorch references run; times say nothing "
            "about GPU performance")


def run_metadata(device: Union[str, torch.device] = "cuda") -> dict[str, Any]:
    """``{"gpu", "mode", "torch", "triton", "cuda", "transformers", "python", "commit", "date"}`` for a run on
    ``device`` (``"gpu"`` names the CPU on a CPU run; ``"mode"`` is :func:`run_mode`; ``"date"`` is UTC ISO-8601).
    Raises as :func:`check_device` does."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    dev = check_device(device)
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name(dev)
    else:
        gpu = f"cpu ({platform.processor() or platform.machine()})"
    return {"gpu": gpu, "mode": run_mode(dev), "torch": torch.__version__, "triton": triton_version,
            "cuda": str(torch.version.cuda), "transformers": transformers.__version__,
            "python": platform.python_version(), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
