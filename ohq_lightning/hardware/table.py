"""Costs measured on another device, read from a lookup table (and written back out).

An FPGA or NPU vendor profiler (or this project's own measured targets, run on the device)
produces per-layer costs; :class:`TableTarget` reads them from a CSV or JSON file keyed by
layer signature (:meth:`~ohq_lightning.plan.LayerInfo.signature`) and option, and
:func:`export_cost_table` writes any :class:`~ohq_lightning.plan.CostTable` in the same format,
so a table measured on one machine can be planned with on another. The format is described in
``docs/cost_table_format.md``; in short, one row per (signature, option) with the columns of
:data:`COLUMNS`, plus optional ``transition`` rows (the cost of a precision change after a layer)
and ``base`` rows (the latency of everything outside the quantizable layers).

Every cost this target returns says ``source="table"``: the numbers were measured elsewhere.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

from ohq_lightning._util.cache import atomic_write
from ohq_lightning.plan import CostTable, LayerCost, LayerInfo, Option, parse_options

__all__ = ["BASE", "COLUMNS", "FORMAT", "TRANSITION", "TableTarget", "export_cost_table", "model_key"]

FORMAT = "ohq-cost-table"
"""Value of the ``format`` key of a JSON cost table (version 1)."""

COLUMNS: tuple[str, ...] = ("signature", "option", "latency_ms", "energy_mj", "weight_bytes", "bops")
"""Columns of a cost table, in the order they are written. ``note`` is also accepted (and ignored)."""

TRANSITION = "transition"
"""Reserved option name: the row's ``latency_ms`` is the cost of a precision change after the layer."""

BASE = "base"
"""Reserved option name: the row's ``latency_ms`` is the model's latency outside the quantizable layers."""

_REQUIRED = ("signature", "option", "latency_ms")
_OPTIONAL_NUMBERS = ("energy_mj", "weight_bytes", "bops")
_ACCEPTED = (*COLUMNS, "note")
_JSON_KEYS = ("format", "version", "target", "options", "meta", "entries")
_MAX_LISTED = 25


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


@dataclass(frozen=True)
class _Entry:
    """One cost row: measured latency, optional energy, optional overrides of size and BOPs."""

    latency_ms: float
    energy_mj: float | None
    weight_bytes: float | None
    bops: float | None


@dataclass(frozen=True)
class _Contents:
    """What a cost-table file holds, parsed and checked."""

    entries: Mapping[tuple[str, str], _Entry]
    transitions: Mapping[str, float]
    base: Mapping[str, float]
    options: tuple[str, ...]
    file_target: str | None
    file_meta: Mapping[str, Any]
    sha256: str


class TableTarget:
    """A hardware target whose costs are read from a CSV or JSON lookup table.

    The file is read and checked once, when the target is built. Rows are keyed by layer
    signature and option (see ``docs/cost_table_format.md``); two layers with the same signature
    share a row. ``weight_bytes`` and ``bops`` left empty are computed from the layer.

    Args:
        path: a ``.csv`` or ``.json`` cost table.
        name: name recorded in cost tables and plans (default ``"table"``).
        options: the candidate options (default: every option the table has rows for, in the
            order the file lists them). Each must be provided by the table.

    Raises:
        ValueError: the file is missing, has an unknown suffix, or is malformed (the message names
            the file, the row and the problem), or an option is not in the table.

    Example:
        >>> import tempfile, pathlib
        >>> from ohq_lightning.plan import LayerInfo
        >>> fc = LayerInfo("fc", "Linear", "linear", [1, 4], [1, 2], [2, 4], 8, 2, macs=8)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "costs.csv"
        >>> _ = path.write_text(f"signature,option,latency_ms\\n{fc.signature()},w8a8,0.25\\n")
        >>> target = TableTarget(path)
        >>> target.options
        ('w8a8',)
        >>> target.costs([fc]).costs["fc"]["w8a8"].latency_ms
        0.25
    """

    def __init__(self, path: str | Path, *, name: str | None = None, options: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self._contents = _read(self.path)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"TableTarget name must be a non-empty string, got {name!r}")
        self.name: str = name if name is not None else "table"
        self.options: tuple[str, ...] = (
            self._contents.options if options is None else self._provided(options, what="TableTarget options")
        )

    def __repr__(self) -> str:
        return f"TableTarget({str(self.path)!r}, name={self.name!r}, options={self.options!r})"

    @property
    def provided_options(self) -> tuple[str, ...]:
        """Every option the table has cost rows for, in file order."""
        return self._contents.options

    def _provided(self, options: Sequence[str], *, what: str) -> tuple[str, ...]:
        names = tuple(option.name for option in parse_options(options))
        absent = [name for name in names if name not in self._contents.options]
        if absent:
            raise ValueError(
                f"{what}: cost table {self.path} does not provide option(s) {absent}; "
                f"it has rows for {list(self._contents.options)}"
            )
        return names

    def costs(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        model: Any = None,
        example_inputs: Any = None,
    ) -> CostTable:
        """Cost table of ``layers`` at ``options`` (default: this target's options), read from the file.

        Raises:
            ValueError: an option is not in the table, or entries are missing; one error lists
                every missing (signature, option) pair with the layers that need it.
        """
        names = self.options if options is None else self._provided(options, what="costs()")
        parsed = [Option.parse(name) for name in names]
        contents = self._contents
        missing: dict[tuple[str, str], list[str]] = {}
        costs: dict[str, dict[str, LayerCost]] = {}
        for layer in layers:
            signature = layer.signature()
            row: dict[str, LayerCost] = {}
            for option in parsed:
                entry = contents.entries.get((signature, option.name))
                if entry is None:
                    missing.setdefault((signature, option.name), []).append(layer.name)
                    continue
                row[option.name] = LayerCost(
                    weight_bytes=entry.weight_bytes if entry.weight_bytes is not None else layer.weight_bytes(option),
                    bops=entry.bops if entry.bops is not None else layer.bops(option),
                    latency_ms=entry.latency_ms,
                    energy_mj=entry.energy_mj,
                    source="table",
                )
            costs[layer.name] = row
        if missing:
            raise ValueError(_missing_message(self.path, missing))

        transitions = {
            layer.name: contents.transitions[layer.signature()]
            for layer in layers
            if layer.signature() in contents.transitions
        }
        key = model_key(layers)
        base = contents.base.get(key, contents.base.get("*"))
        meta: dict[str, Any] = {
            "source": "table",
            "path": str(self.path.resolve()),
            "sha256": contents.sha256,
        }
        if contents.file_target is not None:
            meta["file_target"] = contents.file_target
        if contents.file_meta:
            meta["file_meta"] = dict(contents.file_meta)
        if contents.transitions:
            lacking = [layer.name for layer in layers[:-1] if layer.name not in transitions]
            if lacking:
                meta["transition_missing"] = lacking
        if contents.base and base is None:
            meta["base_latency_missing"] = f"no base row for {key} (and no '*' row)"
        int8 = Option.parse("w8a8")
        return CostTable(
            target=self.name,
            options=list(names),
            costs=costs,
            int8_weight_bytes={layer.name: layer.weight_bytes(int8) for layer in layers},
            meta=meta,
            transition_ms=transitions,
            base_latency_ms=base,
        )


def _missing_message(path: Path, missing: Mapping[tuple[str, str], list[str]]) -> str:
    lines = [f"cost table {path} has no entry for {len(missing)} (signature, option) pair(s):"]
    for (signature, option), layer_names in missing.items():
        lines.append(f"  {signature} @ {option}  (layers: {', '.join(layer_names)})")
    lines.append("add a row for each (or measure them on the device) and read the table again")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading


class _Problems:
    """Collects row problems, so that one error lists them all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.items.append(f"{where}: {problem}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[:_MAX_LISTED]
        more = len(self.items) - len(shown)
        tail = [f"  ... and {more} more"] if more > 0 else []
        raise ValueError("\n".join([f"malformed cost table {self.path}:", *(f"  {p}" for p in shown), *tail]))


def _read(path: Path) -> _Contents:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"cost table {path}: unknown format {path.suffix!r}; use a .csv or .json file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"cost table {path} does not exist") from None
    except OSError as error:
        raise ValueError(f"cost table {path} cannot be read: {error}") from error
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"cost table {path} is not UTF-8 text: {error}") from None
    problems = _Problems(path)
    if suffix == ".csv":
        rows, header = _csv_rows(text, problems), {}
    else:
        rows, header = _json_rows(text, problems)
    contents = _collect(rows, header, problems)
    return _Contents(**contents, sha256=hashlib.sha256(data).hexdigest())


def _csv_rows(text: str, problems: _Problems) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [name.strip() if isinstance(name, str) else name for name in (reader.fieldnames or [])]
    if not fields:
        problems.add("row 1", "no header row; expected columns " + ", ".join(COLUMNS))
        problems.raise_if_any()
    reader.fieldnames = fields
    _check_columns(fields, "row 1 (header)", problems)
    problems.raise_if_any()
    rows = []
    for raw in reader:
        where = f"row {reader.line_num}"
        if None in raw:
            problems.add(where, f"more values than the {len(fields)} columns of the header")
            continue
        rows.append((where, raw))
    return rows


def _json_rows(text: str, problems: _Problems) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        problems.add(f"line {error.lineno}", f"invalid JSON: {error.msg}")
        problems.raise_if_any()
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        problems.add("top level", 'expected an object with an "entries" list (see docs/cost_table_format.md)')
        problems.raise_if_any()
    unknown = sorted(set(data) - set(_JSON_KEYS))
    if unknown:
        problems.add("top level", f"unknown key(s) {unknown}; allowed: {list(_JSON_KEYS)}")
    if data.get("format", FORMAT) != FORMAT:
        problems.add("top level", f'"format" must be {FORMAT!r}, got {data["format"]!r}')
    if data.get("version", 1) != 1:
        problems.add("top level", f'unsupported "version" {data["version"]!r} (this reader knows version 1)')
    if not isinstance(data.get("target", ""), str):
        problems.add("top level", f'"target" must be a string, got {data["target"]!r}')
    if not isinstance(data.get("meta", {}), dict):
        problems.add("top level", f'"meta" must be an object, got {type(data["meta"]).__name__}')
    rows = []
    for index, raw in enumerate(data["entries"]):
        where = f"entries[{index}]"
        if not isinstance(raw, dict):
            problems.add(where, f"expected an object, got {type(raw).__name__}")
            continue
        keys = [key for key in raw if key not in _ACCEPTED]
        if keys:
            problems.add(where, f"unknown key(s) {keys}; allowed: {list(_ACCEPTED)}")
            continue
        absent = [key for key in _REQUIRED if key not in raw]
        if absent:
            problems.add(where, f"missing required key(s) {absent}")
            continue
        rows.append((where, raw))
    return rows, data


def _check_columns(fields: list[Any], where: str, problems: _Problems) -> None:
    unknown = [name for name in fields if name not in _ACCEPTED]
    if unknown:
        problems.add(where, f"unknown column(s) {unknown}; allowed: {list(_ACCEPTED)}")
    absent = [name for name in _REQUIRED if name not in fields]
    if absent:
        problems.add(where, f"missing required column(s) {absent}")
    repeated = sorted({name for name in fields if fields.count(name) > 1})
    if repeated:
        problems.add(where, f"column(s) {repeated} appear more than once")


def _number(value: Any, column: str) -> float | None:
    """A finite, non-negative number, or None for an empty cell; raises ValueError with the reason."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{column} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{column} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{column} must be finite, got {value!r}")
    if number < 0:
        raise ValueError(f"{column} must not be negative, got {value!r}")
    return number


def _collect(rows: list[tuple[str, dict[str, Any]]], header: Mapping[str, Any], problems: _Problems) -> dict[str, Any]:
    entries: dict[tuple[str, str], _Entry] = {}
    transitions: dict[str, float] = {}
    base: dict[str, float] = {}
    first_seen: dict[tuple[str, str], str] = {}
    order: list[str] = []
    for where, raw in rows:
        signature = raw.get("signature")
        option_raw = raw.get("option")
        if not isinstance(signature, str) or not signature.strip():
            problems.add(where, f"signature must be a non-empty string, got {signature!r}")
            continue
        if not isinstance(option_raw, str) or not option_raw.strip():
            problems.add(where, f"option must be a non-empty string, got {option_raw!r}")
            continue
        signature, option_name = signature.strip(), option_raw.strip().lower()
        if option_name not in (TRANSITION, BASE):
            try:
                option_name = Option.parse(option_name).name
            except ValueError as error:
                problems.add(where, f"{error} (or {TRANSITION!r} / {BASE!r} for the special rows)")
                continue
        try:
            numbers = {column: _number(raw.get(column), column) for column in ("latency_ms", *_OPTIONAL_NUMBERS)}
        except ValueError as error:
            problems.add(where, str(error))
            continue
        latency = numbers["latency_ms"]
        if latency is None:
            problems.add(where, "latency_ms is required")
            continue
        key = (signature, option_name)
        if key in first_seen:
            problems.add(where, f"duplicate entry for ({signature}, {option_name}), first given in {first_seen[key]}")
            continue
        first_seen[key] = where
        if option_name in (TRANSITION, BASE):
            extra = [column for column in _OPTIONAL_NUMBERS if numbers[column] is not None]
            if extra:
                problems.add(where, f"a {option_name!r} row has latency_ms only; leave {extra} empty")
                continue
            if option_name == BASE and not (signature == "*" or signature.startswith("model:")):
                problems.add(where, f"a 'base' row's signature is '*' or 'model:<hash>', got {signature!r}")
                continue
            (transitions if option_name == TRANSITION else base)[signature] = latency
            continue
        entries[key] = _Entry(latency, numbers["energy_mj"], numbers["weight_bytes"], numbers["bops"])
        if option_name not in order:
            order.append(option_name)
    if not entries and not problems.items:
        problems.add("table", "no cost rows (every table needs at least one signature/option/latency_ms row)")
    options = _header_options(header, order, problems)
    problems.raise_if_any()
    return {
        "entries": MappingProxyType(entries),
        "transitions": MappingProxyType(transitions),
        "base": MappingProxyType(base),
        "options": options,
        "file_target": header.get("target"),
        "file_meta": MappingProxyType(dict(header.get("meta") or {})),
    }


def _header_options(header: Mapping[str, Any], order: list[str], problems: _Problems) -> tuple[str, ...]:
    """The table's default options: the JSON ``options`` list if given (each must have rows), else file order."""
    if header.get("options") is None:
        return tuple(order)
    try:
        listed = [option.name for option in parse_options(header["options"])]
    except ValueError as error:
        problems.add("top level", f'"options": {error}')
        return tuple(order)
    absent = [name for name in listed if name not in order]
    if absent:
        problems.add("top level", f'"options" lists {absent}, which have no cost rows')
    return tuple(listed) + tuple(name for name in order if name not in listed)


# ---------------------------------------------------------------------------------------------
# Writing


def export_cost_table(
    table: CostTable,
    layers: Sequence[LayerInfo],
    path: str | Path,
    *,
    on_conflict: str = "error",
) -> Path:
    """Write ``table`` as a cost-table file (CSV or JSON by the suffix of ``path``) that :class:`TableTarget` reads.

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
    by_name = {layer.name: layer for layer in layers}
    unknown = [name for name in table.costs if name not in by_name]
    if unknown:
        raise ValueError(f"export_cost_table: no LayerInfo for table layer(s) {unknown}; pass every traced layer")
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
            + ", ".join(no_latency[:_MAX_LISTED])
            + (f" and {len(no_latency) - _MAX_LISTED} more" if len(no_latency) > _MAX_LISTED else "")
        )
    conflicts: list[str] = []
    rows: list[dict[str, Any]] = []
    for (signature, option), members in groups.items():
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

    transitions: dict[str, list[tuple[str, float]]] = {}
    for name, value in table.transition_ms.items():
        if name not in by_name:
            raise ValueError(f"export_cost_table: transition_ms names layer {name!r}, which is not in `layers`")
        transitions.setdefault(by_name[name].signature(), []).append((name, value))
    for signature, members in transitions.items():
        merged = _merge([(value,) for _, value in members], on_conflict)
        if merged is None:
            conflicts.append(f"{signature} @ {TRANSITION}: layers {[name for name, _ in members]} differ")
            continue
        rows.append(_special_row(signature, TRANSITION, merged[0]))
    if conflicts:
        raise ValueError(
            "export_cost_table: layers with the same signature have different costs, but a table has one "
            "row per signature; pass on_conflict='mean' to write their mean:\n  " + "\n  ".join(conflicts)
        )
    if table.base_latency_ms is not None:
        rows.append(_special_row(model_key([by_name[name] for name in table.costs]), BASE, table.base_latency_ms))
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
