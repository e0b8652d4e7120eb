"""Writing any :class:`~ohq_lightning.plan.CostTable` as a cost-table file that the ``table`` target reads.

A table measured on one machine (or exported from a vendor profiler) can so be planned with on
another. Rows are keyed by layer signature, so layers that share a signature share a row.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ohq_lightning._util.cache import atomic_write
from ohq_lightning.hardware.table.schema import BASE, COLUMNS, FORMAT, MAX_LISTED, TRANSITION, model_key
from ohq_lightning.plan import CostTable, LayerCost, LayerInfo

__all__ = ["export_cost_table"]


def export_cost_table(
    table: CostTable,
    layers: Sequence[LayerInfo],
    path: str | Path,
    *,
    on_conflict: str = "error",
) -> Path:
    """Write ``table`` as a cost-table file (CSV or JSON by the suffix of ``path``) that ``TableTarget`` reads.

    Rows are keyed by each layer's signature, so ``layers`` must include every layer of the table.
    Layers sharing a signature share one row: when their costs differ, ``on_conflict="error"``
    (the default) raises and ``"mean"`` writes the mean. The file is written atomically (a
    temporary file in the same folder, then ``os.replace``): if anything fails, the file at
    ``path`` is left as it was and no temporary file remains. A JSON file also keeps the table's
    ``target``, ``options`` and ``meta`` (which must then be JSON-serialisable).

    Returns:
        ``path``.

    Raises:
        ValueError: a layer is missing from ``layers``, an entry has no latency or a bad number,
            same-signature costs conflict, or ``path`` does not end in ``.csv`` / ``.json``.

    Example:
        >>> import tempfile, pathlib
        >>> from ohq_lightning.hardware.analytical import AnalyticalTarget
        >>> from ohq_lightning.hardware.table import TableTarget
        >>> from ohq_lightning.plan import LayerInfo
        >>> layers = [LayerInfo("fc", "Linear", "linear", [1, 4], [1, 2], [2, 4], 8, 2, macs=8)]
        >>> table = AnalyticalTarget().costs(layers)
        >>> path = export_cost_table(table, layers, pathlib.Path(tempfile.mkdtemp()) / "costs.json")
        >>> TableTarget(path).costs(layers).costs["fc"]["w8a8"].latency_ms == table.costs["fc"]["w8a8"].latency_ms
        True
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"cannot export a cost table to {path}: use a .csv or .json suffix")
    if on_conflict not in ("error", "mean"):
        raise ValueError(f"on_conflict must be 'error' or 'mean', got {on_conflict!r}")
    rows = _export_rows(table, layers, on_conflict)
    if suffix == ".csv":
        atomic_write(path, lambda stream: _write_csv(stream, rows))
    else:
        document = {
            "format": FORMAT,
            "version": 1,
            "target": table.target,
            "options": list(table.options),
            "meta": table.meta,
            "entries": [_json_entry(row) for row in rows],
        }
        atomic_write(path, lambda stream: _write_json(stream, document, path))
    return path


def _export_rows(table: CostTable, layers: Sequence[LayerInfo], on_conflict: str) -> list[dict[str, Any]]:
    """Every row of the file: cost rows, then transition rows, then the model's base row."""
    by_name = {layer.name: layer for layer in layers}
    unknown = [name for name in table.costs if name not in by_name]
    if unknown:
        raise ValueError(f"export_cost_table: no LayerInfo for table layer(s) {unknown}; pass every traced layer")
    conflicts: list[str] = []
    rows = _cost_rows(table, by_name, on_conflict, conflicts)
    rows += _transition_rows(table, by_name, on_conflict, conflicts)
    if conflicts:
        raise ValueError(
            "export_cost_table: layers with the same signature have different costs, but a table has one "
            "row per signature; pass on_conflict='mean' to write their mean:\n  " + "\n  ".join(conflicts)
        )
    if table.base_latency_ms is not None:
        rows.append(_special_row(model_key([by_name[name] for name in table.costs]), BASE, table.base_latency_ms))
    return rows


def _grouped_costs(
    table: CostTable, by_name: Mapping[str, LayerInfo]
) -> dict[tuple[str, str], list[tuple[str, LayerCost]]]:
    """The table's entries grouped by (signature, option); raises if an entry has no latency."""
    option_order = list(table.options) + sorted(
        {opt for row in table.costs.values() for opt in row} - set(table.options)
    )
    groups: dict[tuple[str, str], list[tuple[str, LayerCost]]] = {}
    no_latency: list[str] = []
    for name, row in table.costs.items():
        signature = by_name[name].signature()
        for option in option_order:
            cost = row.get(option)
            if cost is None:
                continue
            if cost.latency_ms is None:
                no_latency.append(f"{name} @ {option}")
                continue
            groups.setdefault((signature, option), []).append((name, cost))
    if no_latency:
        raise ValueError(
            "export_cost_table: a cost table file needs latency_ms for every entry; missing for "
            + ", ".join(no_latency[:MAX_LISTED])
            + (f" and {len(no_latency) - MAX_LISTED} more" if len(no_latency) > MAX_LISTED else "")
        )
    return groups


def _cost_rows(
    table: CostTable, by_name: Mapping[str, LayerInfo], on_conflict: str, conflicts: list[str]
) -> list[dict[str, Any]]:
    """One row per (signature, option); a same-signature conflict is appended to ``conflicts``."""
    rows: list[dict[str, Any]] = []
    for (signature, option), members in _grouped_costs(table, by_name).items():
        values = [(cost.latency_ms, cost.energy_mj, cost.weight_bytes, cost.bops) for _, cost in members]
        merged = _merge(values, on_conflict)
        if merged is None:
            differing = [i for i, column in enumerate(zip(*values, strict=True)) if len(set(column)) > 1]
            detail = "; ".join(
                f"{name}: " + ", ".join(f"{COLUMNS[2 + i]}={value[i]!r}" for i in differing)
                for (name, _), value in zip(members, values, strict=True)
            )
            conflicts.append(f"{signature} @ {option}: layers {[name for name, _ in members]} differ ({detail})")
            continue
        rows.append(dict(zip(COLUMNS, (signature, option, *merged), strict=True)))
    return rows


def _transition_rows(
    table: CostTable, by_name: Mapping[str, LayerInfo], on_conflict: str, conflicts: list[str]
) -> list[dict[str, Any]]:
    """One ``transition`` row per signature; a same-signature conflict is appended to ``conflicts``."""
    transitions: dict[str, list[tuple[str, float]]] = {}
    for name, value in table.transition_ms.items():
        if name not in by_name:
            raise ValueError(f"export_cost_table: transition_ms names layer {name!r}, which is not in `layers`")
        transitions.setdefault(by_name[name].signature(), []).append((name, value))
    rows: list[dict[str, Any]] = []
    for signature, members in transitions.items():
        merged = _merge([(value,) for _, value in members], on_conflict)
        if merged is None:
            conflicts.append(f"{signature} @ {TRANSITION}: layers {[name for name, _ in members]} differ")
            continue
        rows.append(_special_row(signature, TRANSITION, merged[0]))
    return rows


def _special_row(signature: str, option: str, latency_ms: Any) -> dict[str, Any]:
    return {"signature": signature, "option": option, "latency_ms": latency_ms}


def _merge(values: list[tuple[Any, ...]], on_conflict: str) -> tuple[Any, ...] | None:
    """The common value of same-signature entries; their mean with ``on_conflict="mean"``; None on conflict."""
    if all(value == values[0] for value in values):
        return values[0]
    if on_conflict != "mean":
        return None
    merged = []
    for column in zip(*values, strict=True):
        present = [value for value in column if value is not None]
        merged.append(None if len(present) < len(column) else sum(present) / len(present))
    return tuple(merged)


def _format_number(value: Any, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"export_cost_table: {column} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"export_cost_table: {column} must be a finite number >= 0, got {value!r}")
    return repr(number)  # the shortest string that reads back as exactly this float


def _json_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    numbers = {column: _format_number(row.get(column), column) for column in COLUMNS[2:]}
    return {
        "signature": row["signature"],
        "option": row["option"],
        **{column: float(text) if text else None for column, text in numbers.items()},
    }


def _write_csv(stream: IO[str], rows: Iterable[Mapping[str, Any]]) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        numbers = [_format_number(row.get(column), column) for column in COLUMNS[2:]]
        writer.writerow([row["signature"], row["option"], *numbers])


def _write_json(stream: IO[str], document: dict[str, Any], path: Path) -> None:
    try:
        json.dump(document, stream, indent=2, allow_nan=False)  # streams: a bad value fails part-way
    except (TypeError, ValueError) as error:
        raise ValueError(f"export_cost_table: cannot write {path} as JSON: {error}") from error
    stream.write("\n")
