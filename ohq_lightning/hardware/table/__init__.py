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

Modules: :mod:`.schema` (columns, reserved names, :func:`model_key`), ``_reader`` (parsing and
checking a file), :mod:`.target` (:class:`TableTarget`), :mod:`.export` (:func:`export_cost_table`).
"""

from ohq_lightning.hardware.table.export import export_cost_table
from ohq_lightning.hardware.table.schema import BASE, COLUMNS, FORMAT, TRANSITION, model_key
from ohq_lightning.hardware.table.target import TableTarget

__all__ = ["BASE", "COLUMNS", "FORMAT", "TRANSITION", "TableTarget", "export_cost_table", "model_key"]
