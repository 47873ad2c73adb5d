"""Checkpoints of the trainers: written to a temporary folder and renamed, with a ``latest`` pointer updated last,
so a crash never leaves one that looks complete; DeepSpeed's sharded checkpoints under ``out_dir/deepspeed``.

A checkpoint holds the model, optimizer and schedule, the RNG states, ``meta`` (JSON: step, data position,
history) and ``state`` (any picklable objects a trainer must carry across a resume, e.g. DAPO's dynamic
sampling buffer).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import torch
from memcomp.trainers.distributed import rank_world


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(out_dir: str, step: int, comp, opt, sched, meta: dict, state: Optional[dict] = None) -> str:
    """Write ``out_dir/ckpt-<step>`` and point ``latest`` at it; returns its path."""
    final = os.path.join(out_dir, f"ckpt-{step:07d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save({"model": comp.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "trainer_state": state or {}},
               os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"step": step, **meta}, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(os.path.join(out_dir, "latest"), os.path.basename(final))
    return final


def load_checkpoint(out_dir: str, comp, opt, sched) -> Optional[tuple[dict, dict]]:
    """Restore the checkpoint ``latest`` points at -> (meta, trainer state); None when there is none."""
    latest = os.path.join(out_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        path = os.path.join(out_dir, f.read().strip())
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    comp.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    return meta, state.get("trainer_state", {})


def save_deepspeed_checkpoint(engine, out_dir: str, step: int, meta: dict, state: Optional[dict] = None) -> None:
    """DeepSpeed's sharded checkpoint under out_dir/deepspeed (its ``latest`` is written only after every
    shard is), with ``meta``, ``state`` and every rank's RNG state in the client state."""
    rng = [None] * rank_world()[1]
    torch.distributed.all_gather_object(rng, torch.get_rng_state())
    engine.save_checkpoint(os.path.join(out_dir, "deepspeed"), tag=f"ckpt-{step:07d}",
                           client_state={"step": step, "rng": rng, "trainer_state": state or {}, **meta})


def load_deepspeed_checkpoint(engine, out_dir: str) -> Optional[tuple[dict, dict]]:
    """-> (meta, trainer state) of the latest DeepSpeed checkpoint, this rank's RNG restored; None without one."""
    root = os.path.join(out_dir, "deepspeed")
    if not os.path.isfile(os.path.join(root, "latest")):
        return None
    _, client = engine.load_checkpoint(root)
    torch.set_rng_state(client["rng"][rank_world()[0]])
    return client, client.get("trainer_state", {})


def export_compressor(comp, engine, path: str) -> None:
    """save_pretrained on rank 0; under ZeRO-3 the partitioned parameters are gathered first."""
    if engine is not None and getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(comp.parameters()), modifier_rank=None):
            if rank_world()[0] == 0:
                comp.save_pretrained(path)
    elif rank_world()[0] == 0:
        comp.save_pretrained(path)


def open_metrics(out_dir: str, start: int):
    """metrics.jsonl holds exactly the steps of the run being continued: on a fresh start it is emptied, on a
    resume from step ``start`` the lines of steps after it (written by an invocation killed before its next
    checkpoint, and about to be redone) are dropped. Returns the file, open for appending."""
    path = os.path.join(out_dir, "metrics.jsonl")
    kept = []
    if start and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", float("inf")) <= start:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
    atomic_write(path, "".join(kept))
    return open(path, "a")


def py_rng_state(rng) -> list[Any]:
    """A ``random.Random``'s state as JSON-able lists (for ``meta``); ``set_py_rng_state`` restores it."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_py_rng_state(rng, state: list[Any]) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))
