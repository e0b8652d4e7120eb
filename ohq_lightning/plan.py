"""The ground floor: plain data passed between the stages of a search.

Every stage reads and writes these dataclasses and nothing else, and every one of them
round-trips through JSON (``to_json`` / ``from_json``), so a table measured on one machine can
be read on another and a plan can be stored beside a checkpoint. Definitions used everywhere:

* **option** -- one candidate precision for a layer: ``w{b}a{b}`` (weights and layer input
  fake-quantized, e.g. ``w4a8``), ``w{b}`` (weights only, input stays float), or a float
  format that leaves the layer as it is (``fp32``, ``bf16``, ``fp16``). Bits are 2 to 8.
* **compression ratio** -- the plan's weight bytes divided by the weight bytes of the same
  quantizable layers at uniform 8 bits: 1.0 is INT8 size, 0.5 half of it. Only the weights
  of quantizable layers count (biases and other parameters are the same in every plan).
* **BOPs** -- bit operations: MACs x weight bits x activation bits (a float operand counts
  with its storage width, 32 for ``fp32``).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ohq_lightning._util.jsonable import JsonMixin

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "UNSUPPORTED",
    "CostTable",
    "LayerCost",
    "LayerInfo",
    "Option",
    "PlanRow",
    "QuantPlan",
    "SensitivityTable",
    "parse_options",
]

MIN_BITS = 2
MAX_BITS = 8
_FLOAT_BITS = {"fp32": 32, "bf16": 16, "fp16": 16}
_OPTION_RE = re.compile(r"^w(\d+)(?:a(\d+))?$")

UNSUPPORTED = "unsupported"
"""The :attr:`LayerCost.source` of an entry the target cannot run (no kernel for that layer at that option).

Such an entry keeps its ``weight_bytes`` and ``bops`` but has no ``latency_ms`` / ``energy_mj``; the
target says why in ``CostTable.meta["unsupported"][layer][option]``. The solver never picks it.
"""


@dataclass(frozen=True)
class Option:
    """One candidate precision for a layer.

    Example:
        >>> Option.parse("w4a8")
        Option(name='w4a8', weight_bits=4, act_bits=8, float_format=None)
        >>> Option.parse("fp32").is_float
        True
    """

    name: str
    weight_bits: int | None = None
    act_bits: int | None = None
    float_format: str | None = None

    @classmethod
    def parse(cls, name: str) -> Option:
        """Parse an option name such as ``"w4a8"``, ``"w8"`` or ``"fp32"``."""
        if not isinstance(name, str):
            raise ValueError(f"option must be a string such as 'w4a8' or 'fp32', got {name!r}")
        key = name.strip().lower()
        if key in _FLOAT_BITS:
            return cls(name=key, float_format=key)
        match = _OPTION_RE.match(key)
        if match is None:
            raise ValueError(
                f"unknown option {name!r}: use 'w<bits>a<bits>' (e.g. 'w4a8'), 'w<bits>' "
                f"(weights only) or one of {sorted(_FLOAT_BITS)}"
            )
        w_bits = int(match.group(1))
        a_bits = int(match.group(2)) if match.group(2) is not None else None
        for what, bits in (("weight", w_bits), ("activation", a_bits)):
            if bits is not None and not MIN_BITS <= bits <= MAX_BITS:
                raise ValueError(f"option {name!r}: {what} bits must be between {MIN_BITS} and {MAX_BITS}, got {bits}")
        return cls(name=key, weight_bits=w_bits, act_bits=a_bits)

    @property
    def is_float(self) -> bool:
        """True when the option leaves the layer in a floating-point format."""
        return self.float_format is not None

    @property
    def weight_storage_bits(self) -> int:
        """Bits stored per weight element (packed integer bits, or the float width)."""
        if self.float_format is not None:
            return _FLOAT_BITS[self.float_format]
        assert self.weight_bits is not None
        return self.weight_bits

    @property
    def act_storage_bits(self) -> int:
        """Bits per input activation element as the layer computes with it."""
        if self.float_format is not None:
            return _FLOAT_BITS[self.float_format]
        return self.act_bits if self.act_bits is not None else 32


def parse_options(names: Any) -> tuple[Option, ...]:
    """Parse and validate a collection of option names (no duplicates, at least one)."""
    if isinstance(names, str):
        names = [names]
    try:
        names = list(names)
    except TypeError:
        raise ValueError(f"options must be a list of names such as ['w4a8', 'w8a8'], got {names!r}") from None
    if not names:
        raise ValueError("options must name at least one precision, e.g. ['w4a8', 'w8a8']")
    parsed = tuple(Option.parse(name) for name in names)
    seen: set[str] = set()
    for option in parsed:
        if option.name in seen:
            raise ValueError(f"option {option.name!r} is listed twice")
        seen.add(option.name)
    return parsed


@dataclass
class LayerInfo(JsonMixin):
    """One quantizable layer, as found by a traced forward pass (shapes are per call, batch 1 MACs)."""

    name: str
    type: str
    kind: str
    in_shape: list[int]
    out_shape: list[int]
    weight_shape: list[int]
    weight_numel: int
    bias_numel: int
    macs: int
    calls: int = 1
    groups: int = 1
    input_nonnegative: bool = False
    stride: list[int] = field(default_factory=lambda: [1, 1])
    padding: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    dilation: list[int] = field(default_factory=lambda: [1, 1])

    def signature(self) -> str:
        """What the layer's cost depends on, as a stable string (op, shapes, stride, padding, groups...).

        Two layers with the same signature cost the same on a device; cost tables and caches are
        keyed by it. Example: ``conv2d|in=1x16x56x56|out=1x24x28x28|w=24x16x3x3|s=2x2|p=1x1x1x1|d=1x1|g=1|bias=0``.
        """
        op = "linear" if self.kind == "linear" else "conv2d"
        parts = [
            op,
            "in=" + "x".join(map(str, self.in_shape)),
            "out=" + "x".join(map(str, self.out_shape)),
            "w=" + "x".join(map(str, self.weight_shape)),
        ]
        if op == "conv2d":
            parts += [
                "s=" + "x".join(map(str, self.stride)),
                "p=" + "x".join(map(str, self.padding)),
                "d=" + "x".join(map(str, self.dilation)),
                f"g={self.groups}",
            ]
        parts.append(f"bias={int(self.bias_numel > 0)}")
        return "|".join(parts)

    def weight_bytes(self, option: Option) -> float:
        """Bytes of this layer's weights stored at ``option``."""
        return self.weight_numel * option.weight_storage_bits / 8.0

    def bops(self, option: Option) -> float:
        """Bit operations of one forward at batch 1 (all calls) at ``option``."""
        return float(self.macs) * option.weight_storage_bits * option.act_storage_bits


@dataclass
class LayerCost(JsonMixin):
    """Cost of one layer at one option; ``source`` says where the numbers came from.

    ``source``: ``"analytical"`` (a model), ``"measured"`` (timed directly here), ``"fitted"`` (fitted from end-to-end
    timings here), ``"table"`` (read from elsewhere), or :data:`UNSUPPORTED` (no kernel; see :attr:`supported`).
    """

    weight_bytes: float
    bops: float
    latency_ms: float | None = None
    energy_mj: float | None = None
    source: str = "analytical"

    @property
    def supported(self) -> bool:
        """False when the target cannot run the layer at this option (``source == UNSUPPORTED``)."""
        return self.source != UNSUPPORTED


@dataclass
class CostTable(JsonMixin):
    """OQA output: layer -> option -> :class:`LayerCost`, plus each layer's 8-bit weight bytes.

    Layers are listed in the order the forward pass runs them. Two optional latency terms make
    the predicted end-to-end latency of a plan ``base_latency_ms + sum(layer latencies) +
    sum(transitions paid)``:

    * ``transition_ms[layer]``: the cost of a precision change at the boundary *after* ``layer``
      (between it and the next layer in forward order): quantizing or dequantizing the activation
      there. A plan pays it when exactly one of the two layers runs an integer option. Forward
      order stands in for the graph's edges: an approximation, exact for chains.
    * ``base_latency_ms``: the time of everything outside the quantizable layers (activations,
      adds, pooling, per-op overhead), measured end to end where the target can.
    """

    target: str
    options: list[str]
    costs: dict[str, dict[str, LayerCost]]
    int8_weight_bytes: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)
    transition_ms: dict[str, float] = field(default_factory=dict)
    base_latency_ms: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostTable:
        """Inverse of ``to_dict``: the nested cost entries become :class:`LayerCost` again."""
        data = dict(data)
        data["costs"] = {
            layer: {opt: LayerCost.from_dict(c) for opt, c in row.items()} for layer, row in data["costs"].items()
        }
        return cls(**data)

    @property
    def layers(self) -> list[str]:
        """Layer names in table order."""
        return list(self.costs)

    def predicted_latency_ms(self, assignment: dict[str, str]) -> float:
        """End-to-end latency this table predicts for ``assignment`` (layer -> option): base + layers + transitions.

        A transition after a layer is paid when exactly one of it and the next layer runs an integer option.
        """
        names = self.layers
        integer = [not Option.parse(assignment[name]).is_float for name in names]
        total = (self.base_latency_ms or 0.0) + sum(self.costs[n][assignment[n]].latency_ms or 0.0 for n in names)
        pairs = zip(names, integer, integer[1:], strict=False)
        return total + sum(self.transition_ms.get(name, 0.0) for name, here, after in pairs if here != after)

    def has_metric(self, metric: str, options: Sequence[str] | None = None, *, skip_unsupported: bool = False) -> bool:
        """True when every entry (at ``options``, default all) has a value for ``metric`` (``latency_ms``...).

        With ``skip_unsupported`` the entries the target cannot run (:attr:`LayerCost.supported` False)
        are left out of the check: what a plan that never picks them needs. Without it they count, so
        e.g. a uniform plan at an option some layer cannot run has no latency.
        """
        wanted = None if options is None else set(options)
        return all(
            getattr(cost, metric) is not None
            for row in self.costs.values()
            for option, cost in row.items()
            if (wanted is None or option in wanted) and (cost.supported or not skip_unsupported)
        )

    def is_supported(self, layer: str, option: str) -> bool:
        """Whether the target can run ``layer`` at ``option`` (see :data:`UNSUPPORTED`)."""
        return self.costs[layer][option].supported

    def unsupported_reason(self, layer: str, option: str) -> str | None:
        """Why the target cannot run ``layer`` at ``option`` (from ``meta["unsupported"]``), or None when it can."""
        if self.is_supported(layer, option):
            return None
        reasons = self.meta.get("unsupported") if isinstance(self.meta, dict) else None
        reason = reasons.get(layer, {}).get(option) if isinstance(reasons, dict) else None
        return str(reason) if reason else "marked unsupported by the target"


@dataclass
class SensitivityTable(JsonMixin):
    """MQE output: layer -> option -> accuracy impact (KL divergence; higher is worse)."""

    method: str
    scores: dict[str, dict[str, float]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """Layer names in table order."""
        return list(self.scores)


_ROW_ALWAYS = ("name", "option", "sensitivity", "weight_bytes", "bops", "latency_ms", "energy_mj", "source")


@dataclass(frozen=True)
class PlanRow(JsonMixin, Mapping):
    """One layer of a :class:`QuantPlan`, for reports: the option picked, its score and its costs.

    The solver fills ``name`` to ``source`` (``None`` where the target gives no such metric) and
    ``transition_after_ms`` when the cost table prices transitions; a search adds ``type``, ``kind``,
    shapes, ``macs`` and ``scores`` (option -> sensitivity). Fields left ``None`` past ``source`` are
    left out of :meth:`to_dict`: the JSON form is the dict rows plans always had, and reads back.
    A row is also a read-only mapping of the keys :meth:`to_dict` writes (``row["name"]``,
    ``row.get("macs")``, ``"macs" in row``, ``dict(row)``), for code written against those dicts;
    new code reads attributes.
    """

    name: str
    option: str
    sensitivity: float | None = None
    weight_bytes: float | None = None
    bops: float | None = None
    latency_ms: float | None = None
    energy_mj: float | None = None
    source: str | None = None
    transition_after_ms: float | None = None
    type: str | None = None
    kind: str | None = None
    in_shape: list[int] | None = None
    out_shape: list[int] | None = None
    macs: int | None = None
    scores: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as a dict: the solver's keys always, the others when set."""
        data = dataclasses.asdict(self)
        return {key: value for key, value in data.items() if key in _ROW_ALWAYS or value is not None}

    def __contains__(self, key: object) -> bool:
        return key in _ROW_KEYS and (key in _ROW_ALWAYS or getattr(self, str(key)) is not None)

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """``row[key]`` when the row has ``key``, else ``default`` (as ``dict.get``)."""
        return getattr(self, key) if key in self else default

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanRow:
        """A row from its dict form; an unknown key is a ``ValueError`` naming it."""
        unknown = sorted(set(data) - set(_ROW_KEYS))
        if unknown:
            raise ValueError(f"plan row {data.get('name')!r} has unknown keys {unknown}")
        return cls(**data)

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


_ROW_KEYS = tuple(f.name for f in dataclasses.fields(PlanRow))


@dataclass
class QuantPlan(JsonMixin):
    """One option per layer, with predicted totals and the budgets it was solved under.

    ``assignment`` maps layer name to option name (``"w4a8"``, ``"fp32"``...). ``predicted``
    holds at least ``size_ratio`` (see the module docstring), ``weight_bytes``, ``bops`` and
    ``sensitivity``, plus ``latency_ms`` / ``energy_mj`` when the target gives them. ``layers``: one
    :class:`PlanRow` per layer for reports (dict rows given here are read into rows).
    """

    assignment: dict[str, str]
    predicted: dict[str, float]
    budgets: dict[str, float] = field(default_factory=dict)
    status: str = "Optimal"
    target: str = ""
    options: list[str] = field(default_factory=list)
    layers: list[PlanRow] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = [row if isinstance(row, PlanRow) else PlanRow.from_dict(row) for row in self.layers]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form; each row as :meth:`PlanRow.to_dict` writes it."""
        data = super().to_dict()
        data["layers"] = [row.to_dict() for row in self.layers]
        return data

    def option_counts(self) -> dict[str, int]:
        """How many layers take each option (in the order options first appear)."""
        return dict(Counter(self.assignment.values()))

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON to ``path`` and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_json(path)
        return path
