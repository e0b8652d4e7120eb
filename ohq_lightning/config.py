"""The settings of a search, as two frozen objects checked once: :class:`Budgets` and :class:`SearchConfig`.

``search``, ``solve``, :class:`~ohq_lightning.OHQCallback` and the Hydra app all take these objects (or
the same keywords, from which they build them), so a budget or a setting is validated in one place and
means the same thing at every entry point.

Example:
    >>> budgets = Budgets(compression_ratio=0.6)
    >>> SearchConfig().objective(budgets)[0]
    'sensitivity'
    >>> SearchConfig().objective(Budgets())[1].sensitivity_budget
    'w8a8'
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ohq_lightning.plan import Option, SensitivityTable, parse_options

__all__ = [
    "DEFAULT_ACCURACY_BOUND",
    "MINIMIZE",
    "MQE_METHODS",
    "RESOURCE_BUDGETS",
    "SENSITIVITY_METHODS",
    "SYNTHETIC_KINDS",
    "Budgets",
    "SearchConfig",
    "check_cost_weight",
    "check_int",
    "check_minimize",
    "real_number",
    "resolve_objective",
    "settings_from",
]

RESOURCE_BUDGETS: Mapping[str, str] = MappingProxyType(
    {
        "compression_ratio": "weight_bytes",
        "latency_budget": "latency_ms",
        "energy_budget": "energy_mj",
        "bops_budget": "bops",
    }
)
"""Resource budget -> the :class:`~ohq_lightning.plan.LayerCost` metric whose plan total it bounds (each > 0)."""

MINIMIZE: tuple[str, ...] = ("auto", "sensitivity", "latency")
"""What a search may minimise; ``auto`` picks by the budgets given (see :meth:`SearchConfig.objective`)."""

MQE_METHODS: tuple[str, ...] = ("quantize", "random_mask")
"""MQE's two readings of "perturb one layer": they score layers on synthetic inputs."""

SENSITIVITY_METHODS: tuple[str, ...] = (*MQE_METHODS, "weight_error", "random")
"""Sensitivities a search computes by name: MQE's two readings, then two data-free baselines.

The sensitivity registry (:data:`ohq_lightning.sensitivity.SENSITIVITY_REGISTRY`) implements exactly these."""

SYNTHETIC_KINDS: tuple[str, ...] = ("distilled", "gaussian")
"""Data-free inputs MQE scores layers on: BatchNorm-statistics matching, or standard normal noise."""

_MAX_COMPRESSION_RATIO = 4.0  # every layer in fp32: 32 bits a weight over 8; any larger ratio binds nothing
DEFAULT_ACCURACY_BOUND = "w8a8"
"""Minimising latency with no sensitivity budget: no more total sensitivity than this uniform option."""


def real_number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (numpy scalars too, bools not), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _positive(name: str, value: Any) -> float | None:
    if value is None:
        return None
    number = real_number(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _sensitivity_bound(value: Any) -> float | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return Option.parse(value).name
        except ValueError as error:
            raise ValueError(
                f"sensitivity_budget must be a number >= 0 or an option name such as 'w8a8' (no more total "
                f"sensitivity than that option everywhere), got {value!r}: {error}"
            ) from error
    number = real_number(value)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"sensitivity_budget must be a finite number >= 0 or an option name, got {value!r}")
    return number


def check_cost_weight(value: Any) -> float:
    """``cost_weight`` as a float: a finite number >= 0 (the weight of a cost beside sensitivity)."""
    weight = real_number(value)
    if weight is None or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"cost_weight must be a finite number >= 0, got {value!r}")
    return weight


def check_minimize(value: Any, allowed: Sequence[str] = MINIMIZE) -> str:
    """``minimize`` when it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"minimize must be one of {list(allowed)}, got {value!r}")
    return str(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int when it is an integer (numpy's too, not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Budgets:
    """What a plan may cost, each bound optional; checked once, here.

    Args:
        compression_ratio: plan weight bytes / weight bytes of the same layers at uniform 8 bits
            (1.0 is INT8 size, 0.5 half of it; above 1 lets some layers stay in a float format, up to 4.0,
            every layer in fp32).
        latency_budget: predicted end-to-end latency, ms (base + layers + transitions of the target's
            cost table; see :class:`~ohq_lightning.plan.CostTable`).
        energy_budget: predicted energy, mJ.
        bops_budget: bit operations (MACs x weight bits x activation bits).
        sensitivity_budget: total sensitivity allowed (>= 0), or an option name: ``"w8a8"`` allows no
            more total sensitivity than uniform w8a8 as the target runs it.

    Example:
        >>> Budgets(compression_ratio=0.5).given()
        {'compression_ratio': 0.5}
        >>> Budgets(sensitivity_budget="W8A8").sensitivity_budget
        'w8a8'
    """

    compression_ratio: float | None = None
    latency_budget: float | None = None
    energy_budget: float | None = None
    bops_budget: float | None = None
    sensitivity_budget: float | str | None = None

    def __post_init__(self) -> None:
        for name in RESOURCE_BUDGETS:
            object.__setattr__(self, name, _positive(name, getattr(self, name)))
        if self.compression_ratio is not None and self.compression_ratio > _MAX_COMPRESSION_RATIO:
            raise ValueError(
                f"compression_ratio must be in (0, {_MAX_COMPRESSION_RATIO:g}]: it is the plan's weight bytes over the "
                f"weight bytes at uniform 8 bits (1.0 = INT8 size, 4.0 = all fp32), got {self.compression_ratio:g}; "
                f"for a percentage such as 60% give 0.6"
            )
        object.__setattr__(self, "sensitivity_budget", _sensitivity_bound(self.sensitivity_budget))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Budgets:
        """Budgets from a mapping of budget name -> value; an unknown name is a ``ValueError`` naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown budget {unknown[0]!r}: use one of {sorted(known)}")
        return cls(**values)

    def given(self) -> dict[str, float | str]:
        """The budgets that are set, by name (in field order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def resources(self) -> dict[str, float]:
        """The resource budgets that are set (every budget but ``sensitivity_budget``)."""
        return {name: value for name, value in self.given().items() if name in RESOURCE_BUDGETS}  # type: ignore[misc]

    def replace(self, **changes: Any) -> Budgets:
        """A copy with some budgets changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, float | str | None]:
        """Plain-data form, every field."""
        return dataclasses.asdict(self)


SensitivitySource = str | SensitivityTable | Callable[..., SensitivityTable]


@dataclass(frozen=True)
class SearchConfig:
    """How a search runs, apart from its budgets; checked once, here.

    Args:
        options: candidate options per layer (default: the target's), e.g. ``("w8a8", "w4a8", "w2a8")``.
        sensitivity: a method name from :data:`SENSITIVITY_METHODS`; a precomputed
            :class:`~ohq_lightning.plan.SensitivityTable` covering every layer and option; or a provider
            ``sensitivity(model, layers, options) -> SensitivityTable`` (e.g. the Hessian baseline with
            its data).
        synthetic: data-free inputs for MQE, ``"distilled"`` or ``"gaussian"``.
        num_samples: synthetic inputs MQE scores layers on.
        distill_steps: optimisation steps of the distilled inputs.
        minimize: ``"auto"`` (sensitivity under a resource budget; with none, latency under uniform
            INT8's sensitivity), ``"sensitivity"`` or ``"latency"``.
        tie_groups: groups of layer names that must share one option.
        cost_weight: weight of the target's latency beside sensitivity in the objective (0: none).
        refine_rounds: with a target that times whole plans, how often to time the plan picked,
            refit and solve again.
        seed: seed of everything random in the search.

    Example:
        >>> SearchConfig(options=["W4A8", "w8a8"]).options
        ('w4a8', 'w8a8')
    """

    options: tuple[str, ...] | None = None
    sensitivity: SensitivitySource = "quantize"
    synthetic: str = "distilled"
    num_samples: int = 8
    distill_steps: int = 20
    minimize: str = "auto"
    tie_groups: tuple[tuple[str, ...], ...] = ()
    cost_weight: float = 0.0
    refine_rounds: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.options is not None:
            object.__setattr__(self, "options", tuple(option.name for option in parse_options(self.options)))
        _check_sensitivity_source(self.sensitivity)
        if self.synthetic not in SYNTHETIC_KINDS:
            raise ValueError(f"unknown synthetic input kind {self.synthetic!r}; use one of {list(SYNTHETIC_KINDS)}")
        object.__setattr__(self, "num_samples", check_int("num_samples", self.num_samples, 1))
        object.__setattr__(self, "distill_steps", check_int("distill_steps", self.distill_steps, 1))
        check_minimize(self.minimize)
        object.__setattr__(self, "tie_groups", _check_tie_groups(self.tie_groups))
        object.__setattr__(self, "cost_weight", check_cost_weight(self.cost_weight))
        if self.minimize == "latency" and self.cost_weight > 0:
            raise ValueError("cost_weight weighs a cost against sensitivity; with minimize='latency' leave it at 0")
        object.__setattr__(self, "refine_rounds", check_int("refine_rounds", self.refine_rounds, 0))
        object.__setattr__(self, "seed", check_int("seed", self.seed, 0))

    @property
    def uses_mqe(self) -> bool:
        """Whether the sensitivity is MQE's (scored on synthetic inputs)."""
        return self.sensitivity in MQE_METHODS

    def replace(self, **changes: Any) -> SearchConfig:
        """A copy with some settings changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def objective(self, budgets: Budgets) -> tuple[str, Budgets]:
        """What to minimise under which budgets: :func:`resolve_objective` of this config's ``minimize``."""
        return resolve_objective(self.minimize, budgets)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form; a sensitivity table or provider is named by its kind."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not isinstance(self.sensitivity, str):
            data["sensitivity"] = (
                f"table:{self.sensitivity.method}"
                if isinstance(self.sensitivity, SensitivityTable)
                else f"provider:{getattr(self.sensitivity, '__name__', type(self.sensitivity).__name__)}"
            )
        data["options"] = None if self.options is None else list(self.options)
        data["tie_groups"] = [list(group) for group in self.tie_groups]
        return data


def resolve_objective(minimize: str, budgets: Budgets) -> tuple[str, Budgets]:
    """What to minimise under which budgets, with ``auto`` and the default accuracy bound resolved.

    ``auto`` minimises sensitivity when a resource budget is given and latency otherwise.
    Minimising latency with no sensitivity budget bounds the sensitivity by uniform INT8's
    (``"w8a8"``): the fastest plan estimated to be as accurate as INT8, not the fastest at any cost.
    Minimising sensitivity needs a resource budget: without one every layer would stay at its
    least sensitive option, so that is refused.

    Example:
        >>> resolve_objective("auto", Budgets())
        ('latency', Budgets(compression_ratio=None, latency_budget=None, energy_budget=None, bops_budget=None, \
sensitivity_budget='w8a8'))
    """
    minimize = check_minimize(minimize)
    if minimize == "auto":
        minimize = "sensitivity" if budgets.resources() else "latency"
    if minimize == "latency" and budgets.sensitivity_budget is None:
        budgets = budgets.replace(sensitivity_budget=DEFAULT_ACCURACY_BOUND)
    if minimize == "sensitivity" and not budgets.resources():
        raise ValueError(
            "minimize='sensitivity' needs a resource budget (compression_ratio, latency_budget, energy_budget "
            "or bops_budget): without one every layer stays at its least sensitive option"
        )
    return minimize, budgets


def settings_from(
    budgets: Budgets | None,
    config: SearchConfig | None,
    keywords: Mapping[str, Any],
    *,
    caller: str,
    config_keyword: str = "config",
) -> tuple[Budgets, SearchConfig]:
    """The budgets and search settings of an entry point, from the objects or from loose keywords.

    ``keywords`` may hold any :class:`Budgets` and :class:`SearchConfig` field; they build the object
    that was not given. An object of the wrong type, or an object and keywords for it too, is a
    ``ValueError``; an unknown keyword a ``TypeError`` naming ``caller``, as Python's own would.
    ``config_keyword`` is what the caller calls its ``SearchConfig`` argument (``config`` for
    ``search``, ``search`` for the callback).

    Example:
        >>> settings_from(None, None, {"compression_ratio": 0.5, "seed": 3}, caller="search")[1].seed
        3
    """
    budget_names = {f.name for f in dataclasses.fields(Budgets)}
    config_names = {f.name for f in dataclasses.fields(SearchConfig)}
    unknown = sorted(set(keywords) - budget_names - config_names)
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    loose_budgets = {name: value for name, value in keywords.items() if name in budget_names}
    loose_config = {name: value for name, value in keywords.items() if name in config_names}
    for given, kind, loose, name in (
        (budgets, Budgets, loose_budgets, "budgets"),
        (config, SearchConfig, loose_config, config_keyword),
    ):
        if given is not None and not isinstance(given, kind):
            raise ValueError(f"{name} must be a {kind.__name__} or None, got {type(given).__name__}")
        if given is not None and loose:
            raise ValueError(f"give {name}={kind.__name__}(...) or its fields as keywords, not both: {sorted(loose)}")
    return (
        Budgets(**loose_budgets) if budgets is None else budgets,
        SearchConfig(**loose_config) if config is None else config,
    )


def _check_sensitivity_source(sensitivity: Any) -> None:
    if isinstance(sensitivity, str):
        if sensitivity not in SENSITIVITY_METHODS:
            raise ValueError(f"unknown sensitivity method {sensitivity!r}; use one of {list(SENSITIVITY_METHODS)}")
    elif not isinstance(sensitivity, SensitivityTable) and not callable(sensitivity):
        raise ValueError(
            f"sensitivity must be a method name ({list(SENSITIVITY_METHODS)}), a SensitivityTable or a provider "
            f"(model, layers, options) -> SensitivityTable, got {type(sensitivity).__name__}"
        )


def _check_tie_groups(groups: Any) -> tuple[tuple[str, ...], ...]:
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise ValueError(f"tie_groups must be a list of lists of layer names, got {groups!r}")
    checked = []
    for group in groups:
        if isinstance(group, str) or not isinstance(group, Sequence) or not all(isinstance(n, str) for n in group):
            raise ValueError(f"each tie group must be a list of layer names, got {group!r}")
        checked.append(tuple(group))
    return tuple(checked)
