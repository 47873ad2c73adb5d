"""What a measurement ran on: GPU (or CPU), library versions, git commit, date. Recorded with every
benchmark and TTFT result."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """Short commit of the checkout memcomp runs from, ``-dirty`` with uncommitted tracked changes; where git
    cannot tell (a copy of the tree without .git, as on a lent GPU machine), ``$MEMCOMP_COMMIT`` or "unknown"."""
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


def run_metadata(device: str = "cuda") -> dict[str, Any]:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "triton": triton_version, "cuda": str(torch.version.cuda),
            "transformers": transformers.__version__, "python": platform.python_version(),
            "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
