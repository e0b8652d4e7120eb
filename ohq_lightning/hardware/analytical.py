"""An analytical hardware model: size and BOPs are exact, latency and energy are estimates.

Latency is a roofline: a layer takes the longer of its compute time (MACs at the throughput
of the kernel it would run on) and its memory time (weight bytes plus input and output
activations at the given bandwidth). Sub-8-bit weights are assumed to run on the 8-bit
integer kernel (no CPU has faster sub-8-bit convolution kernels), so they save memory but not
compute. Energy uses per-operation figures in the spirit of Horowitz (ISSCC 2014): a MAC
costs more at wider operands, and every byte moved from memory costs the same.

The defaults describe a generic desktop CPU core and are *not measured*: every cost entry this
target writes says ``source="analytical"``. For costs measured on the device, use a measured
target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ohq_lightning.plan import CostTable, LayerCost, LayerInfo, Option, parse_options

__all__ = ["DEFAULT_OPTIONS", "AnalyticalTarget"]

DEFAULT_OPTIONS: tuple[str, ...] = ("w8a8", "w4a8", "w2a8")


@dataclass(frozen=True)
class AnalyticalTarget:
    """Roofline latency and per-operation energy, computed from each layer's shapes.

    Args:
        name: name recorded in cost tables and plans.
        options: candidate options of every layer.
        int8_gmacs: 8-bit integer MACs per second (billions), used for every integer option.
        fp32_gmacs: fp32 MACs per second (billions).
        half_gmacs: bf16/fp16 MACs per second (billions).
        bandwidth_gbs: memory bandwidth in GB/s.
        mac_energy_pj: energy of one MAC per operand width (bits -> picojoules).
        byte_energy_pj: energy of moving one byte from memory.

    Example:
        >>> target = AnalyticalTarget(options=("w8a8", "w4a8"))
        >>> target.name
        'analytical'
    """

    name: str = "analytical"
    options: tuple[str, ...] = DEFAULT_OPTIONS
    int8_gmacs: float = 100.0
    fp32_gmacs: float = 25.0
    half_gmacs: float = 50.0
    bandwidth_gbs: float = 20.0
    mac_energy_pj: tuple[tuple[int, float], ...] = ((8, 0.23), (16, 1.5), (32, 4.6))
    byte_energy_pj: float = 20.0

    def __post_init__(self) -> None:
        parse_options(self.options)
        for field_name in ("int8_gmacs", "fp32_gmacs", "half_gmacs", "bandwidth_gbs", "byte_energy_pj"):
            value = getattr(self, field_name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"AnalyticalTarget.{field_name} must be a positive number, got {value!r}")

    def _throughput_macs_per_s(self, option: Option) -> float:
        if option.float_format == "fp32":
            return self.fp32_gmacs * 1e9
        if option.is_float:
            return self.half_gmacs * 1e9
        if option.act_bits is None:  # weight-only: dequantized weights, float compute
            return self.fp32_gmacs * 1e9
        return self.int8_gmacs * 1e9

    def _mac_energy_pj(self, option: Option) -> float:
        width = max(option.weight_storage_bits, option.act_storage_bits)
        for bits, energy in self.mac_energy_pj:
            if width <= bits:
                return energy
        return self.mac_energy_pj[-1][1]

    def cost(self, layer: LayerInfo, option: Option) -> LayerCost:
        """Cost of one layer at one option."""
        weight_bytes = layer.weight_bytes(option)
        act_bytes = option.act_storage_bits / 8.0
        moved = weight_bytes + layer.calls * (math.prod(layer.in_shape) * act_bytes + math.prod(layer.out_shape) * 4.0)
        compute_s = layer.macs / self._throughput_macs_per_s(option)
        memory_s = moved / (self.bandwidth_gbs * 1e9)
        energy_pj = layer.macs * self._mac_energy_pj(option) + moved * self.byte_energy_pj
        return LayerCost(
            weight_bytes=weight_bytes,
            bops=layer.bops(option),
            latency_ms=max(compute_s, memory_s) * 1e3,
            energy_mj=energy_pj * 1e-9,
            source="analytical",
        )

    def costs(self, layers: Sequence[LayerInfo], options: Sequence[str] | None = None) -> CostTable:
        """Cost table of ``layers`` at ``options`` (default: this target's options)."""
        parsed = parse_options(self.options if options is None else options)
        int8 = Option.parse("w8a8")
        return CostTable(
            target=self.name,
            options=[o.name for o in parsed],
            costs={layer.name: {o.name: self.cost(layer, o) for o in parsed} for layer in layers},
            int8_weight_bytes={layer.name: layer.weight_bytes(int8) for layer in layers},
            meta={
                "source": "analytical",
                "model": "roofline latency, per-operation energy; parameters not measured",
                "int8_gmacs": self.int8_gmacs,
                "fp32_gmacs": self.fp32_gmacs,
                "half_gmacs": self.half_gmacs,
                "bandwidth_gbs": self.bandwidth_gbs,
            },
        )
