"""From layer profiles to a :class:`~ohq_lightning.plan.CostTable`: entries, transitions and what the meta records.

An entry is the median time per call of the layer's fastest implementation times the layer's calls
per forward; entering int8 at the first layer and leaving it at the last have no boundary, so they
are added to those layers' int8 entries. Options a layer has no kernel for are ``unsupported`` with
the reason in ``meta["unsupported"]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ohq_lightning.hardware.base import int8_weight_bytes
from ohq_lightning.hardware.cuda.options import DeviceInfo, check_options, kernel_of, tf32_flags
from ohq_lightning.hardware.cuda.profiling import LayerResult
from ohq_lightning.plan import UNSUPPORTED, CostTable, LayerCost, LayerInfo, Option

__all__ = ["Selection", "assemble_costs", "cost_table", "transitions_ms"]


@dataclass(frozen=True)
class Selection:
    """What one measurement covers: the options, the kernels they run on, the batch, and the base."""

    names: tuple[str, ...]
    kernel_of_option: dict[str, str]
    batch: int
    base_note: str | None  # why the rest of the network is not measured, None when it is

    @classmethod
    def of(cls, options: Sequence[str], capability: tuple[int, int], batch: int, base_note: str | None) -> Selection:
        """Check ``options`` for a GPU of ``capability`` and map each to its kernel."""
        names = check_options(options, capability)
        return cls(names, {name: kernel_of(name) for name in names}, batch, base_note)

    @property
    def kernels(self) -> list[str]:
        """The kernels the options run on, in order of first use."""
        return list(dict.fromkeys(self.kernel_of_option.values()))

    @property
    def timed(self) -> list[str]:
        """The kernels timed: the options' kernels, plus fp32 when the base needs it."""
        kernels = self.kernels
        return kernels if self.base_note is not None or "fp32" in kernels else [*kernels, "fp32"]

    @property
    def integer(self) -> bool:
        """Whether an option runs on the int8 kernel (then transitions are timed)."""
        return "int8" in self.kernels

    @property
    def halves(self) -> list[str]:
        """The half formats whose casts are timed (only when fp32 is among the kernels)."""
        kernels = self.kernels
        return [kernel for kernel in kernels if kernel in ("fp16", "bf16")] if "fp32" in kernels else []


def _unsupported_reason(result: LayerResult, kernel: str) -> str:
    reasons = result.reasons.get(kernel, {}).items()
    return "; ".join(reason if impl == "*" else f"{impl}: {reason}" for impl, reason in reasons) or "no implementation"


def assemble_costs(
    layers: Sequence[LayerInfo],
    names: Sequence[str],
    kernel_of_option: Mapping[str, str],
    results: Mapping[str, LayerResult],
    integer: bool,
) -> tuple[dict[str, dict[str, LayerCost]], dict[str, dict[str, str]]]:
    """Cost entries from the measurements; options a layer has no kernel for are ``unsupported``."""
    table: dict[str, dict[str, LayerCost]] = {}
    unsupported: dict[str, dict[str, str]] = {}
    last = len(layers) - 1
    for index, layer in enumerate(layers):
        result = results[layer.name]
        row: dict[str, LayerCost] = {}
        for name in names:
            option = Option.parse(name)
            kernel = kernel_of_option[name]
            best = result.best.get(kernel)
            if best is None:
                unsupported.setdefault(layer.name, {})[name] = _unsupported_reason(result, kernel)
                row[name] = LayerCost(layer.weight_bytes(option), layer.bops(option), None, None, UNSUPPORTED)
                continue
            latency = best[0].median_ms * layer.calls
            if integer and kernel == "int8":
                latency += result.parts["quantize"] if index == 0 else 0.0
                latency += result.parts["dequantize"] if index == last else 0.0
            energy = result.energy.get(kernel)
            row[name] = LayerCost(
                weight_bytes=layer.weight_bytes(option),
                bops=layer.bops(option),
                latency_ms=latency,
                energy_mj=None if energy is None else energy * layer.calls,
                source="measured",
            )
        table[layer.name] = row
    return table, unsupported


def transitions_ms(layers: Sequence[LayerInfo], results: Mapping[str, LayerResult], integer: bool) -> dict[str, float]:
    """``transition_ms[l]`` = (quantize of the next layer's input + dequantize of ``l``'s output) / 2."""
    if not integer:
        return {}
    names = [layer.name for layer in layers]
    return {
        here: (results[after].parts["quantize"] + results[here].parts["dequantize"]) / 2
        for here, after in itertools.pairwise(names)
    }


def _kernel_meta(results: Mapping[str, LayerResult]) -> dict[str, Any]:
    return {
        "implementations": {
            name: {kernel: impl for kernel, (_, impl) in result.best.items()} for name, result in results.items()
        },
        "kernel_details": {name: dict(result.details) for name, result in results.items()},
    }


def _model_meta(selection: Selection, results: Mapping[str, LayerResult]) -> dict[str, Any]:
    """How the table's latency adds up, and the transitions and casts measured for it."""
    integer, halves = selection.integer, selection.halves
    parts = ("quantize", "dequantize")
    return {
        "latency_model": "base + sum(isolated layer kernels) + sum(transitions where integer meets float)",
        "layer_latency_is": "median time of the layer's kernel alone (synthetic operands, real shapes), "
        "times its calls per forward",
        "transitions": (
            "transition_ms[l] = (quantize of the next layer's input + dequantize of l's output) / 2; "
            "entering int8 at the first layer and leaving it at the last are in their int8 entries"
            if integer
            else "none: no integer option"
        ),
        "transition_parts_ms": {
            name: {part: ms for part, ms in result.parts.items() if part in parts} for name, result in results.items()
        }
        if integer
        else {},
        "float_casts": "not charged: half layers are timed with half operands; casts measured per layer in "
        "float_cast_ms (input fp32 -> half + output half -> fp32)",
        "float_cast_ms": {
            name: {half: result.parts[f"cast_in:{half}"] + result.parts[f"cast_out:{half}"] for half in halves}
            for name, result in results.items()
        }
        if halves
        else {},
    }


def cost_table(
    target: str,
    layers: Sequence[LayerInfo],
    selection: Selection,
    results: Mapping[str, LayerResult],
    *,
    info: DeviceInfo,
    base: tuple[float | None, dict[str, Any]],
    energy: str,
    run: Mapping[str, Any],
) -> CostTable:
    """The cost table of one measurement; ``run`` adds the settings and bookkeeping to the end of its meta."""
    integer = selection.integer
    costs, unsupported = assemble_costs(layers, selection.names, selection.kernel_of_option, results, integer)
    base_ms, base_meta = base
    meta = {
        "source": "measured",
        "device": info.to_dict(),
        "tf32": tf32_flags(),
        "batch_size": selection.batch,
        "kernel_of_option": selection.kernel_of_option,
        **_kernel_meta(results),
        "unsupported": unsupported,
        **_model_meta(selection, results),
        "base": base_meta,
        "energy": energy,
        "fp8": "transitions are not charged for fp8 (float in, float out: the input cast is in its entry)"
        if "fp8" in selection.kernels
        else "not among the options",
        **run,
    }
    return CostTable(
        target=target,
        options=list(selection.names),
        costs=costs,
        int8_weight_bytes=int8_weight_bytes(layers),
        transition_ms=transitions_ms(layers, results, integer),
        base_latency_ms=base_ms,
        meta=meta,
    )
