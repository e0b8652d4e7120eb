"""An analytical hardware model: size and BOPs are exact, latency and energy are estimates.

Latency is a roofline: a layer takes the longer of its compute time (MACs at the throughput
of the kernel it would run on) and its memory time (weight bytes plus input and output
activations at the given bandwidth). Sub-8-bit weights are assumed to run on the 8-bit
integer kernel (no CPU has faster sub-8-bit convolution kernels), so they save memory but not
compute. Energy uses per-operation figures in the spirit of Horowitz (ISSCC 2014): a MAC
costs more at wider operands, and every byte moved from memory costs the same.

The defaults describe a generic desktop CPU core and are *not measured*: every cost entry this
target writes says ``source="analytical"`` and every table's meta says ``"kind": "estimated"``.
For costs measured on the device, use a measured target.

:class:`BitSerialTarget` models a bit-serial accelerator (an FPGA overlay or NPU whose compute
time scales with weight bits x activation bits), where low-bit options really are faster.
Named, ready-made parameter sets live in :mod:`ohq_lightning.hardware.presets`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ohq_lightning.hardware.base import int8_weight_bytes
from ohq_lightning.plan import CostTable, LayerCost, LayerInfo, Option, parse_options

__all__ = ["BIT_SERIAL_OPTIONS", "DEFAULT_OPTIONS", "AnalyticalTarget", "BitSerialTarget"]

DEFAULT_OPTIONS: tuple[str, ...] = ("w8a8", "w4a8", "w2a8")
BIT_SERIAL_OPTIONS: tuple[str, ...] = ("w8a8", "w4a8", "w4a4", "w2a4", "w2a2")


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
        _require_positive(self, ("int8_gmacs", "fp32_gmacs", "half_gmacs", "bandwidth_gbs", "byte_energy_pj"))

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

    def costs(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        model: Any = None,
        example_inputs: Any = None,
    ) -> CostTable:
        """Cost table of ``layers`` at ``options`` (default: this target's options)."""
        parsed = parse_options(self.options if options is None else options)
        return _estimated_table(
            self.name,
            layers,
            parsed,
            self.cost,
            {
                "model": "roofline latency, per-operation energy; parameters not measured",
                "int8_gmacs": self.int8_gmacs,
                "fp32_gmacs": self.fp32_gmacs,
                "half_gmacs": self.half_gmacs,
                "bandwidth_gbs": self.bandwidth_gbs,
            },
        )


@dataclass(frozen=True)
class BitSerialTarget:
    """A bit-serial accelerator: compute time scales with weight bits x activation bits.

    Bit-serial engines (Stripes/Loom-style ASICs, BISMO-style FPGA overlays) process one bit
    plane of each operand per step, so a ``w{b}a{b}`` MAC costs ``b_w * b_a`` one-bit steps:
    ``w2a2`` computes 16x faster than ``w8a8``. A layer's latency is a fixed per-layer overhead
    (configuration, DMA set-up) plus the longer of its compute time and its memory time
    (packed weights, input activations at ``a`` bits and outputs at ``out_bits`` moved at
    ``bandwidth_gbs``), so a small layer stays memory-bound however few bits it uses. Only
    integer ``w{b}a{b}`` options exist on such a device (no float, no weight-only). The
    defaults describe a mid-size FPGA overlay and are *not measured*: every entry says
    ``source="analytical"``.

    Args:
        name: name recorded in cost tables and plans.
        options: candidate options; each must be ``w{b}a{b}``.
        bit_gops: one-bit x one-bit MACs per second, in billions (PEs x clock).
        bandwidth_gbs: off-chip memory bandwidth in GB/s.
        out_bits: bits per output activation written back (re-quantized accumulators).
        layer_overhead_us: fixed time per layer call, in microseconds.
        bit_mac_energy_pj: energy of one one-bit x one-bit MAC step, in picojoules.
        byte_energy_pj: energy of moving one byte from off-chip memory.

    Example:
        >>> from ohq_lightning.plan import LayerInfo
        >>> conv = LayerInfo("c", "Conv2d", "conv", [1, 64, 56, 56], [1, 64, 56, 56], [64, 64, 3, 3],
        ...                  36864, 0, macs=115_605_504, padding=[1, 1, 1, 1])
        >>> table = BitSerialTarget().costs([conv], ["w8a8", "w2a2"])
        >>> table.costs["c"]["w2a2"].latency_ms < table.costs["c"]["w8a8"].latency_ms / 10
        True
    """

    name: str = "bit_serial_accel"
    options: tuple[str, ...] = BIT_SERIAL_OPTIONS
    bit_gops: float = 4096.0
    bandwidth_gbs: float = 4.0
    out_bits: int = 8
    layer_overhead_us: float = 1.0
    bit_mac_energy_pj: float = 0.004
    byte_energy_pj: float = 20.0

    def __post_init__(self) -> None:
        self._integer_options(self.options)
        _require_positive(self, ("bit_gops", "bandwidth_gbs", "bit_mac_energy_pj", "byte_energy_pj"))
        if not (_is_number(self.layer_overhead_us) and self.layer_overhead_us >= 0):
            raise ValueError(f"BitSerialTarget.layer_overhead_us must be a number >= 0, got {self.layer_overhead_us!r}")
        if isinstance(self.out_bits, bool) or not isinstance(self.out_bits, int) or not 1 <= self.out_bits <= 32:
            raise ValueError(f"BitSerialTarget.out_bits must be an integer from 1 to 32, got {self.out_bits!r}")

    def _integer_options(self, options: Sequence[str]) -> tuple[Option, ...]:
        parsed = parse_options(options)
        unsupported = [o.name for o in parsed if o.is_float or o.act_bits is None]
        if unsupported:
            raise ValueError(
                f"{self.name} computes in integers only: options {unsupported} are not supported; "
                "use w<bits>a<bits> options such as 'w4a4'"
            )
        return parsed

    def compute_ms(self, layer: LayerInfo, option: Option) -> float:
        """Compute time of one layer (all calls) at one integer option, in milliseconds."""
        assert option.weight_bits is not None and option.act_bits is not None
        return layer.macs * option.weight_bits * option.act_bits / (self.bit_gops * 1e9) * 1e3

    def memory_ms(self, layer: LayerInfo, option: Option) -> float:
        """Time to move the layer's packed weights and its activations, in milliseconds."""
        return self._moved_bytes(layer, option) / (self.bandwidth_gbs * 1e9) * 1e3

    def _moved_bytes(self, layer: LayerInfo, option: Option) -> float:
        acts = math.prod(layer.in_shape) * option.act_storage_bits + math.prod(layer.out_shape) * self.out_bits
        return layer.weight_bytes(option) + layer.calls * acts / 8.0

    def cost(self, layer: LayerInfo, option: Option) -> LayerCost:
        """Cost of one layer at one integer option."""
        assert option.weight_bits is not None and option.act_bits is not None
        overhead_ms = layer.calls * self.layer_overhead_us * 1e-3
        energy_pj = (
            layer.macs * option.weight_bits * option.act_bits * self.bit_mac_energy_pj
            + self._moved_bytes(layer, option) * self.byte_energy_pj
        )
        return LayerCost(
            weight_bytes=layer.weight_bytes(option),
            bops=layer.bops(option),
            latency_ms=overhead_ms + max(self.compute_ms(layer, option), self.memory_ms(layer, option)),
            energy_mj=energy_pj * 1e-9,
            source="analytical",
        )

    def costs(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        model: Any = None,
        example_inputs: Any = None,
    ) -> CostTable:
        """Cost table of ``layers`` at ``options`` (default: this target's options)."""
        parsed = self._integer_options(self.options if options is None else options)
        return _estimated_table(
            self.name,
            layers,
            parsed,
            self.cost,
            {
                "model": "bit-serial: overhead + max(MACs x w_bits x a_bits / bit_gops, bytes / bandwidth); "
                "parameters not measured",
                "bit_gops": self.bit_gops,
                "bandwidth_gbs": self.bandwidth_gbs,
                "out_bits": self.out_bits,
                "layer_overhead_us": self.layer_overhead_us,
            },
        )


def _require_positive(target: object, field_names: Sequence[str]) -> None:
    """Raise ValueError naming the first of ``field_names`` that is not a finite number > 0."""
    for field_name in field_names:
        value = getattr(target, field_name)
        if not (_is_number(value) and value > 0):
            raise ValueError(f"{type(target).__name__}.{field_name} must be a positive number, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _estimated_table(
    name: str,
    layers: Sequence[LayerInfo],
    options: Sequence[Option],
    cost: Callable[[LayerInfo, Option], LayerCost],
    details: dict[str, Any],
) -> CostTable:
    """A cost table from a model's per-entry ``cost``, marked as estimated in its meta."""
    return CostTable(
        target=name,
        options=[o.name for o in options],
        costs={layer.name: {o.name: cost(layer, o) for o in options} for layer in layers},
        int8_weight_bytes=int8_weight_bytes(layers),
        meta={"source": "analytical", "kind": "estimated", **details},
    )
