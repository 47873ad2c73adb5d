"""Thin training scripts (installed as ``memcomp.trainers``): ``cpt``, ``sft`` and ``dapo``, over shared modules --
``config`` (nested frozen configs, ``key=value`` overrides), ``recipes`` (registered recipe functions), ``build``
(compressor, data stream, optimizer), ``loop`` (the CPT / SFT loop and run bookkeeping), ``checkpoint`` and
``distributed`` (DeepSpeed ZeRO-3)."""

if __name__ == "trainers":  # pragma: no cover - exercised in a subprocess by tests/test_packaging.py
    # Python was started in a memcomp checkout: this folder is memcomp.trainers, never top-level `trainers`.
    raise ModuleNotFoundError("No module named 'trainers' (the 'trainers' folder of this memcomp checkout is "
                              "memcomp.trainers)", name="trainers")

import importlib

_LAZY = {"apply_overrides": "memcomp.trainers.config", "TrainConfig": "memcomp.trainers.config",
         "DAPOConfig": "memcomp.trainers.config", "recipe": "memcomp.trainers.recipes",
         "RECIPES": "memcomp.trainers.recipes", "train": "memcomp.trainers.loop"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memcomp.trainers' has no attribute {name!r}")
