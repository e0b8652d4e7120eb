"""Reading a cost-table file (CSV or JSON) and checking it, so that one error lists every problem found."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ohq_lightning.hardware.table.schema import (
    ACCEPTED,
    BASE,
    COLUMNS,
    FORMAT,
    JSON_KEYS,
    MAX_LISTED,
    OPTIONAL_NUMBERS,
    REQUIRED,
    TRANSITION,
)
from ohq_lightning.plan import Option, parse_options

__all__ = ["Contents", "Entry", "read_table"]

_Rows = list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Entry:
    """One cost row: measured latency, optional energy, optional overrides of size and BOPs."""

    latency_ms: float
    energy_mj: float | None
    weight_bytes: float | None
    bops: float | None


@dataclass(frozen=True)
class Contents:
    """What a cost-table file holds, parsed and checked."""

    entries: Mapping[tuple[str, str], Entry]
    transitions: Mapping[str, float]
    base: Mapping[str, float]
    options: tuple[str, ...]
    file_target: str | None
    file_meta: Mapping[str, Any]
    sha256: str


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
        shown = self.items[:MAX_LISTED]
        more = len(self.items) - len(shown)
        tail = [f"  ... and {more} more"] if more > 0 else []
        raise ValueError("\n".join([f"malformed cost table {self.path}:", *(f"  {p}" for p in shown), *tail]))


def read_table(path: Path) -> Contents:
    """Read and check the cost table at ``path``; raises ValueError naming the file, the row and the problem."""
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
    return Contents(**contents, sha256=hashlib.sha256(data).hexdigest())


def _csv_rows(text: str, problems: _Problems) -> _Rows:
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


def _json_rows(text: str, problems: _Problems) -> tuple[_Rows, dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        problems.add(f"line {error.lineno}", f"invalid JSON: {error.msg}")
        problems.raise_if_any()
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        problems.add("top level", 'expected an object with an "entries" list (see docs/cost_table_format.md)')
        problems.raise_if_any()
    _check_header(data, problems)
    rows = []
    for index, raw in enumerate(data["entries"]):
        where = f"entries[{index}]"
        if not isinstance(raw, dict):
            problems.add(where, f"expected an object, got {type(raw).__name__}")
            continue
        keys = [key for key in raw if key not in ACCEPTED]
        if keys:
            problems.add(where, f"unknown key(s) {keys}; allowed: {list(ACCEPTED)}")
            continue
        absent = [key for key in REQUIRED if key not in raw]
        if absent:
            problems.add(where, f"missing required key(s) {absent}")
            continue
        rows.append((where, raw))
    return rows, data


def _check_header(data: Mapping[str, Any], problems: _Problems) -> None:
    """The top-level keys of a JSON table other than its entries."""
    unknown = sorted(set(data) - set(JSON_KEYS))
    if unknown:
        problems.add("top level", f"unknown key(s) {unknown}; allowed: {list(JSON_KEYS)}")
    if data.get("format", FORMAT) != FORMAT:
        problems.add("top level", f'"format" must be {FORMAT!r}, got {data["format"]!r}')
    if data.get("version", 1) != 1:
        problems.add("top level", f'unsupported "version" {data["version"]!r} (this reader knows version 1)')
    if not isinstance(data.get("target", ""), str):
        problems.add("top level", f'"target" must be a string, got {data["target"]!r}')
    if not isinstance(data.get("meta", {}), dict):
        problems.add("top level", f'"meta" must be an object, got {type(data["meta"]).__name__}')


def _check_columns(fields: list[Any], where: str, problems: _Problems) -> None:
    unknown = [name for name in fields if name not in ACCEPTED]
    if unknown:
        problems.add(where, f"unknown column(s) {unknown}; allowed: {list(ACCEPTED)}")
    absent = [name for name in REQUIRED if name not in fields]
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


def _parse_row(where: str, raw: Mapping[str, Any], problems: _Problems) -> tuple[str, str, dict[str, Any]] | None:
    """A row's signature, option name and numbers (``latency_ms`` present); None (and a problem noted) if bad."""
    signature = raw.get("signature")
    option_raw = raw.get("option")
    if not isinstance(signature, str) or not signature.strip():
        problems.add(where, f"signature must be a non-empty string, got {signature!r}")
        return None
    if not isinstance(option_raw, str) or not option_raw.strip():
        problems.add(where, f"option must be a non-empty string, got {option_raw!r}")
        return None
    signature, option_name = signature.strip(), option_raw.strip().lower()
    if option_name not in (TRANSITION, BASE):
        try:
            option_name = Option.parse(option_name).name
        except ValueError as error:
            problems.add(where, f"{error} (or {TRANSITION!r} / {BASE!r} for the special rows)")
            return None
    try:
        numbers = {column: _number(raw.get(column), column) for column in ("latency_ms", *OPTIONAL_NUMBERS)}
    except ValueError as error:
        problems.add(where, str(error))
        return None
    if numbers["latency_ms"] is None:
        problems.add(where, "latency_ms is required")
        return None
    return signature, option_name, numbers


def _special_row_ok(
    where: str, signature: str, option_name: str, numbers: Mapping[str, Any], problems: _Problems
) -> bool:
    """Whether a ``transition`` or ``base`` row is well formed (latency only; a base row names a model or ``*``)."""
    extra = [column for column in OPTIONAL_NUMBERS if numbers[column] is not None]
    if extra:
        problems.add(where, f"a {option_name!r} row has latency_ms only; leave {extra} empty")
        return False
    if option_name == BASE and not (signature == "*" or signature.startswith("model:")):
        problems.add(where, f"a 'base' row's signature is '*' or 'model:<hash>', got {signature!r}")
        return False
    return True


def _collect(rows: _Rows, header: Mapping[str, Any], problems: _Problems) -> dict[str, Any]:
    entries: dict[tuple[str, str], Entry] = {}
    special: dict[str, dict[str, float]] = {TRANSITION: {}, BASE: {}}
    first_seen: dict[tuple[str, str], str] = {}
    order: list[str] = []
    for where, raw in rows:
        parsed = _parse_row(where, raw, problems)
        if parsed is None:
            continue
        signature, option_name, numbers = parsed
        key = (signature, option_name)
        if key in first_seen:
            problems.add(where, f"duplicate entry for ({signature}, {option_name}), first given in {first_seen[key]}")
            continue
        first_seen[key] = where
        if option_name in special:
            if _special_row_ok(where, signature, option_name, numbers, problems):
                special[option_name][signature] = numbers["latency_ms"]
            continue
        entries[key] = Entry(numbers["latency_ms"], numbers["energy_mj"], numbers["weight_bytes"], numbers["bops"])
        if option_name not in order:
            order.append(option_name)
    if not entries and not problems.items:
        problems.add("table", "no cost rows (every table needs at least one signature/option/latency_ms row)")
    options = _header_options(header, order, problems)
    problems.raise_if_any()
    return {
        "entries": MappingProxyType(entries),
        "transitions": MappingProxyType(special[TRANSITION]),
        "base": MappingProxyType(special[BASE]),
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
