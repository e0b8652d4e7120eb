"""The ``table`` target: costs measured on another device, read from a CSV or JSON lookup table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ohq_lightning.hardware.base import int8_weight_bytes
from ohq_lightning.hardware.table._reader import read_table
from ohq_lightning.hardware.table.schema import model_key
from ohq_lightning.plan import CostTable, LayerCost, LayerInfo, Option, parse_options

__all__ = ["TableTarget"]


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
        self._contents = read_table(self.path)
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
        costs = self._layer_costs(layers, [Option.parse(name) for name in names])
        transitions = {
            layer.name: self._contents.transitions[layer.signature()]
            for layer in layers
            if layer.signature() in self._contents.transitions
        }
        key = model_key(layers)
        base = self._contents.base.get(key, self._contents.base.get("*"))
        return CostTable(
            target=self.name,
            options=list(names),
            costs=costs,
            int8_weight_bytes=int8_weight_bytes(layers),
            meta=self._meta(layers, transitions, key, base),
            transition_ms=transitions,
            base_latency_ms=base,
        )

    def _layer_costs(self, layers: Sequence[LayerInfo], options: Sequence[Option]) -> dict[str, dict[str, LayerCost]]:
        """Every layer's row of costs; raises one error listing every (signature, option) the file lacks."""
        missing: dict[tuple[str, str], list[str]] = {}
        costs: dict[str, dict[str, LayerCost]] = {}
        for layer in layers:
            signature = layer.signature()
            row: dict[str, LayerCost] = {}
            for option in options:
                entry = self._contents.entries.get((signature, option.name))
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
        return costs

    def _meta(
        self, layers: Sequence[LayerInfo], transitions: Mapping[str, float], key: str, base: float | None
    ) -> dict[str, Any]:
        """Where the numbers came from (file, hash, its own target and meta), and which special rows it lacks."""
        contents = self._contents
        meta: dict[str, Any] = {"source": "table", "path": str(self.path.resolve()), "sha256": contents.sha256}
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
        return meta


def _missing_message(path: Path, missing: Mapping[tuple[str, str], list[str]]) -> str:
    lines = [f"cost table {path} has no entry for {len(missing)} (signature, option) pair(s):"]
    for (signature, option), layer_names in missing.items():
        lines.append(f"  {signature} @ {option}  (layers: {', '.join(layer_names)})")
    lines.append("add a row for each (or measure them on the device) and read the table again")
    return "\n".join(lines)
