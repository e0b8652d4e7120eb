"""The arguments of :class:`~ohq_lightning.lightning.OHQCallback`, checked once when it is built.

Budgets and search settings are checked by :class:`~ohq_lightning.config.Budgets` and
:class:`~ohq_lightning.config.SearchConfig` alone; this module routes loose keywords to them and checks
what only the callback takes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ohq_lightning.plan import QuantPlan

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_example_inputs",
    "optional_path",
    "read_plan",
    "renamed_arguments",
]

_RENAMED = {"hardware": "target", "example_input": "example_inputs"}
"""Old argument name -> new name; the old one still works, with a ``DeprecationWarning``."""


def renamed_arguments(values: Mapping[str, Any], keywords: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``values`` (new name -> value) with the old names in ``keywords`` moved in, and the keywords left.

    Each old name warns (``DeprecationWarning``); giving an old name and its new one is a ``ValueError``.
    """
    values, rest = dict(values), dict(keywords)
    for old, new in _RENAMED.items():
        if old not in rest:
            continue
        if values[new] is not None:
            raise ValueError(f"{old}= is the old name of {new}=: give only {new}=")
        warnings.warn(
            f"OHQCallback({old}=...) is deprecated and will be removed: use OHQCallback({new}=...)",
            DeprecationWarning,
            stacklevel=3,
        )
        values[new] = rest.pop(old)
    return values, rest


def read_plan(plan: QuantPlan | Mapping[str, Any] | str | Path | None) -> QuantPlan | None:
    """A plan given as a plan, its dict, a mapping of layer name to option, or a ``plan.json`` path."""
    if plan is None or isinstance(plan, QuantPlan):
        return plan
    if isinstance(plan, Mapping):
        if plan and all(isinstance(key, str) and isinstance(value, str) for key, value in plan.items()):
            return QuantPlan(assignment=dict(plan), predicted={})  # layer name -> option
        try:
            return QuantPlan.from_dict(dict(plan))
        except TypeError as error:
            raise ValueError(
                f"plan dict is neither a QuantPlan dict nor a mapping of layer name to option: {error}"
            ) from error
    if isinstance(plan, (str, Path)):
        path = Path(plan)
        if not path.is_file():
            raise ValueError(f"plan file {str(plan)!r} does not exist")
        try:
            return QuantPlan.from_json(path)
        except (ValueError, TypeError) as error:
            raise ValueError(f"plan file {str(plan)!r} is not a QuantPlan JSON file: {error}") from error
    raise ValueError(
        "plan must be a QuantPlan, a plan dict, a mapping of layer name to option, or a path to a plan.json file, "
        f"got {type(plan).__name__}"
    )


def check_example_inputs(value: Any) -> Any:
    """A tensor, a tuple/list of arguments or a dict of keywords (or ``None``)."""
    if value is not None and not isinstance(value, (torch.Tensor, tuple, list, Mapping)):
        raise ValueError(
            "example_inputs must be a tensor, a tuple/list of arguments or a dict of keywords, "
            f"got {type(value).__name__}"
        )
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` when it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str | None:
    """``value`` when it is one of ``choices`` or ``None``."""
    if value is not None and value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)} or None, got {value!r}")
    return value


def check_callable(name: str, value: Any, default: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``value`` when it is callable (``default`` for ``None``)."""
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be a callable batch -> model input, got {value!r}")
    return value or default


def optional_path(name: str, value: Any) -> Path | None:
    """``value`` as a path (``None`` stays ``None``)."""
    if value is not None and not isinstance(value, (str, Path)):
        raise ValueError(f"{name} must be a file path or None, got {value!r}")
    return None if value is None else Path(value).expanduser()
