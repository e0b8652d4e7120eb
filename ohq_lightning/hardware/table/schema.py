"""The cost-table file format: its columns, its reserved option names, and the key of a model's ``base`` row.

Shared by the reader (:mod:`~ohq_lightning.hardware.table.target`) and the writer
(:mod:`~ohq_lightning.hardware.table.export`), so that what one writes the other reads. The format
is described in ``docs/cost_table_format.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ohq_lightning.plan import LayerInfo

__all__ = [
    "ACCEPTED",
    "BASE",
    "COLUMNS",
    "FORMAT",
    "JSON_KEYS",
    "MAX_LISTED",
    "OPTIONAL_NUMBERS",
    "REQUIRED",
    "TRANSITION",
    "model_key",
]

FORMAT = "ohq-cost-table"
"""Value of the ``format`` key of a JSON cost table (version 1)."""

COLUMNS: tuple[str, ...] = ("signature", "option", "latency_ms", "energy_mj", "weight_bytes", "bops")
"""Columns of a cost table, in the order they are written. ``note`` is also accepted (and ignored)."""

TRANSITION = "transition"
"""Reserved option name: the row's ``latency_ms`` is the cost of a precision change after the layer."""

BASE = "base"
"""Reserved option name: the row's ``latency_ms`` is the model's latency outside the quantizable layers."""

REQUIRED: tuple[str, ...] = ("signature", "option", "latency_ms")
"""Columns every row must have."""

OPTIONAL_NUMBERS: tuple[str, ...] = ("energy_mj", "weight_bytes", "bops")
"""Numeric columns a row may leave empty (size and BOPs are then computed from the layer)."""

ACCEPTED: tuple[str, ...] = (*COLUMNS, "note")
"""Every column (or JSON entry key) a reader accepts."""

JSON_KEYS: tuple[str, ...] = ("format", "version", "target", "options", "meta", "entries")
"""Top-level keys of a JSON cost table."""

MAX_LISTED = 25
"""At most this many problems are listed in one error message."""


def model_key(layers: Sequence[LayerInfo]) -> str:
    """The key of a model's ``base`` row: a hash of its layers' signatures in forward order.

    Example:
        >>> from ohq_lightning.plan import LayerInfo
        >>> layer = LayerInfo("fc", "Linear", "linear", [1, 4], [1, 2], [2, 4], 8, 2, macs=8)
        >>> model_key([layer]).startswith("model:")
        True
    """
    digest = hashlib.sha256("\n".join(layer.signature() for layer in layers).encode()).hexdigest()
    return "model:" + digest[:16]
