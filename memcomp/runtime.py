"""How many CPU threads a run uses, chosen deliberately and reported.

PyTorch's default is one thread per core. When another job already keeps a core busy, torch's threads
contend with it and a CPU step can slow down ten-fold or more (measured on 2 cores: the demo went from
~0.4 s to 14-60 s per step; with one thread at the same moment, ~14x faster). So the automatic choice
counts the cores this process may run on and leaves out the ones other jobs keep busy (measured over half a
second from /proc/stat), never going below one. An explicit request wins, then ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform tells, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(requested: int = 0) -> tuple[int, str]:
    """-> (threads, why). ``requested`` > 0: that many; else ``$OMP_NUM_THREADS`` when set to a positive
    integer; else the available cores minus those other jobs keep busy right now (``busy_cores``, rounded),
    at least 1. Raises ``ValueError`` for a negative request or a malformed ``OMP_NUM_THREADS``."""
    if requested < 0:
        raise ValueError(f"threads must be >= 0 (0 = choose automatically), got {requested}")
    if requested:
        return requested, "threads= option"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"OMP_NUM_THREADS={env!r} is not a positive integer")
        return int(env), "OMP_NUM_THREADS"
    cores = available_cores()
    busy = busy_cores()
    if busy is None:
        return cores, f"{cores} cores"
    n = max(1, min(cores, cores - round(busy)))
    return n, f"{cores} cores, {busy:.1f} busy with other jobs"


def busy_cores(window_s: float = 0.5) -> float | None:
    """Cores kept busy by other processes right now: the machine's non-idle CPU time over ``window_s`` seconds
    (/proc/stat), while this process sleeps. The load average is not used: it decays over a minute, so just after
    a heavy command (pip in set-up, a test run) it still reports busy cores on an idle machine. None where
    /proc/stat is unreadable (not Linux)."""
    import time

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    a = sample()
    if a is None:
        return None
    time.sleep(window_s)
    b = sample()
    if b is None or b[0] <= a[0]:
        return None
    busy_fraction = 1.0 - (b[1] - a[1]) / (b[0] - a[0])
    return max(0.0, busy_fraction) * (os.cpu_count() or 1)


def set_threads(requested: int = 0) -> str:
    """Apply ``choose_threads`` to torch (intra-op threads) and return a header fragment such as
    "threads 1 (2 cores, load 1.2 from other jobs; set threads=N or OMP_NUM_THREADS to choose)"."""
    import torch

    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    return f"threads {n} ({why}; set threads=N or OMP_NUM_THREADS to choose)"
