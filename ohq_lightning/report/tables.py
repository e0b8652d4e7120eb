"""Readable reports of a plan as Markdown tables (readable as plain text too): a per-layer table and totals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ohq_lightning.plan import QuantPlan

__all__ = ["format_plan_table", "format_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with padded columns (readable as plain text too); numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True))
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)


def format_plan_table(plan: QuantPlan) -> str:
    """Per-layer table (layer, type, output shape, MACs, option, weight KiB, latency, sensitivity) and totals.

    Example:
        >>> plan = QuantPlan(assignment={"fc": "w4a8"}, predicted={"size_ratio": 0.5},
        ...                  layers=[{"name": "fc", "option": "w4a8", "weight_bytes": 512.0}])
        >>> print(format_plan_table(plan).splitlines()[0])  # doctest: +NORMALIZE_WHITESPACE
        | layer | type | output | MACs | option | weight KiB | latency ms | KL |
    """
    rows = []
    for row in plan.layers:
        weight_bytes = row.get("weight_bytes")
        rows.append(
            [
                row["name"],
                row.get("type"),
                row.get("out_shape"),
                row.get("macs"),
                row["option"],
                None if weight_bytes is None else weight_bytes / 1024.0,
                row.get("latency_ms"),
                row.get("sensitivity"),
            ]
        )
    headers = ["layer", "type", "output", "MACs", "option", "weight KiB", "latency ms", "KL"]
    table = format_table(headers, rows)
    counts = ", ".join(f"{option}: {n}" for option, n in sorted(plan.option_counts().items()))
    totals = ", ".join(f"{key}={_cell(float(value))}" for key, value in plan.predicted.items())
    lines = [table, "", f"options: {counts}", f"predicted: {totals}"]
    if plan.budgets:
        lines.append("budgets: " + ", ".join(f"{k}={v}" for k, v in plan.budgets.items()))
    skipped = plan.meta.get("skipped_layers") or {}
    if skipped:
        lines.append(f"left in float ({len(skipped)}): " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return "\n".join(lines)
