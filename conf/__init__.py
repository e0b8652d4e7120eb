"""Hydra config package of ohq_lightning (found as pkg://ohq_lightning.conf from an installed wheel)."""
