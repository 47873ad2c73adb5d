"""Thin training scripts (installed as ``memcomp.trainers``): CPT, SFT and DAPO land here."""
