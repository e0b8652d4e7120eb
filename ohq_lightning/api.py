"""Deprecated: ``search`` moved to :mod:`ohq_lightning.pipeline` (also ``ohq_lightning.search``)."""

from __future__ import annotations

import warnings

from ohq_lightning.pipeline import search

__all__ = ["search"]

warnings.warn(
    "ohq_lightning.api is deprecated: import search from ohq_lightning (or ohq_lightning.pipeline)",
    DeprecationWarning,
    stacklevel=2,
)
