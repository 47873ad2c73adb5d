"""Thin training scripts (installed as ``memcomp.trainers``): CPT, SFT and DAPO land here."""

if __name__ == "trainers":  # pragma: no cover - exercised in a subprocess by tests/test_packaging.py
    # Python was started in a memcomp checkout: this folder is memcomp.trainers, never top-level `trainers`.
    raise ModuleNotFoundError("No module named 'trainers' (the 'trainers' folder of this memcomp checkout is "
                              "memcomp.trainers)", name="trainers")
