"""Atomic JSON Lines output for the evaluation data sets: a file is either complete or absent."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, Union

PathLike = Union[str, "os.PathLike[str]"]


def write_jsonl_atomic(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` to ``path``, one JSON object per line (UTF-8, non-ASCII kept), and return how many.

    Rows are streamed to ``<path>.tmp-<pid>`` in the same folder and renamed over ``path`` only after the last
    one is written and flushed to disk (``os.replace`` is atomic on POSIX and Windows): an exception in the
    producer or the encoder, or a killed process, leaves any earlier file at ``path`` untouched and never a
    half-written one. The temporary file is removed on an exception. Raises ``FileNotFoundError`` when the
    folder does not exist, and whatever the rows' producer or ``json`` raises (``TypeError`` for a value JSON
    cannot encode)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    tmp = f"{path}.tmp-{os.getpid()}"
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False))
                f.write("\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return n
