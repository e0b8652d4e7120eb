"""ohq_lightning: on-chip hardware-aware mixed-precision quantization (OHQ).

The public API, usable without Lightning or Hydra::

    import timm, torch, ohq_lightning as ohq

    model = timm.create_model("resnet18", pretrained=False)
    plan = ohq.search(model, torch.randn(1, 3, 224, 224), compression_ratio=0.6)
    ohq.apply_plan(model, plan)   # fake-quant twins, same weight Parameters
    ohq.strip_plan(model)         # back to plain modules

With Lightning, ``Trainer(callbacks=[ohq.OHQCallback(compression_ratio=0.6)])`` makes ``fit``
search, swap and fine-tune with quantization in the loop.
"""

from typing import Any

from ohq_lightning.config import Budgets, SearchConfig
from ohq_lightning.hardware import AnalyticalTarget, CPUTarget, HardwareTarget, PlanMeasuringTarget, create_target
from ohq_lightning.layers import LayerTrace, trace_layers
from ohq_lightning.pipeline import search
from ohq_lightning.plan import CostTable, LayerCost, LayerInfo, Option, PlanRow, QuantPlan, SensitivityTable
from ohq_lightning.quant import QuantLayer, apply_plan, calibrate, quantized_layers, strip_plan
from ohq_lightning.report import format_plan_table
from ohq_lightning.sensitivity import distilled_inputs, gaussian_inputs, mqe_sensitivity
from ohq_lightning.solver import InfeasibleBudgetError, pareto_sweep, solve

__version__ = "0.1.0.dev0"

__all__ = [
    "AnalyticalTarget",
    "Budgets",
    "CPUTarget",
    "CostTable",
    "HardwareTarget",
    "InfeasibleBudgetError",
    "LayerCost",
    "LayerInfo",
    "LayerTrace",
    "OHQCallback",
    "Option",
    "PlanMeasuringTarget",
    "PlanRow",
    "QATDivergedError",
    "QuantLayer",
    "QuantPlan",
    "SearchConfig",
    "SensitivityTable",
    "__version__",
    "apply_plan",
    "calibrate",
    "create_target",
    "distilled_inputs",
    "format_plan_table",
    "gaussian_inputs",
    "mqe_sensitivity",
    "pareto_sweep",
    "plan_from_checkpoint",
    "quantized_layers",
    "search",
    "solve",
    "strip_plan",
    "trace_layers",
]

_LIGHTNING_EXPORTS = ("OHQCallback", "QATDivergedError", "plan_from_checkpoint")


def __getattr__(name: str) -> Any:
    """The Lightning callback's names, imported on first use.

    ``ohq_lightning.lightning`` imports Lightning, a heavy import (seconds) that ``search`` and the
    rest of the library do not need: deferring it keeps ``import ohq_lightning`` light.
    """
    if name in _LIGHTNING_EXPORTS:
        import ohq_lightning.lightning  # deferred: imports the third-party lightning (heavy)

        return getattr(ohq_lightning.lightning, name)
    raise AttributeError(f"module 'ohq_lightning' has no attribute {name!r}")
