"""The fake-quant layers :class:`~ohq_lightning.lightning.OHQCallback` installs, and what it says when QAT diverges."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ohq_lightning.plan import Option, QuantPlan
from ohq_lightning.quant import ActivationFakeQuant, WeightFakeQuant, apply_plan, quantized_layers

__all__ = ["QATDivergedError", "diverged_error", "install_plan", "non_finite_layers", "swapped_assignment"]


class QATDivergedError(RuntimeError):
    """Quantization-aware fine-tuning produced a non-finite loss."""


def swapped_assignment(assignment: Mapping[str, str]) -> dict[str, str]:
    """The layers a plan swaps (everything but ``fp32``), with canonical option names.

    Two plans that swap the same layers to the same options build the same quantized module.
    """
    parsed = {name: Option.parse(option) for name, option in assignment.items()}
    return {name: option.name for name, option in parsed.items() if option.float_format != "fp32"}


def install_plan(module: torch.nn.Module, plan: QuantPlan) -> bool:
    """Apply ``plan`` unless ``module`` already holds it; True when layers were swapped now."""
    wanted = swapped_assignment(plan.assignment)
    applied = {name: layer.option for name, layer in quantized_layers(module).items()}
    if applied == wanted:
        return False
    if applied:
        raise ValueError(
            "the module already holds fake-quant layers of another plan: call strip_plan(module) first, "
            "or give the callback that plan"
        )
    apply_plan(module, plan)
    return bool(wanted)


def non_finite_layers(module: torch.nn.Module) -> list[str]:
    """``name (what)`` for every fake-quant layer whose step sizes or weights hold a NaN or an infinity."""
    found = []
    for name, layer in quantized_layers(module).items():
        parts = []
        if isinstance(layer.input_quantizer, ActivationFakeQuant) and not torch.isfinite(layer.input_quantizer.scale):
            parts.append("input step size")
        if isinstance(layer.weight_quantizer, WeightFakeQuant) and not bool(
            torch.isfinite(layer.weight_quantizer.scale).all()
        ):
            parts.append("weight step sizes")
        if not bool(torch.isfinite(layer.weight.detach()).all()):
            parts.append("weight")
        bias = getattr(layer.module, "bias", None)
        if isinstance(bias, torch.Tensor) and not bool(torch.isfinite(bias).all()):
            parts.append("bias")
        if parts:
            found.append(f"{name} ({', '.join(parts)})")
    return found


def diverged_error(module: torch.nn.Module, loss: torch.Tensor, step: int, *, here: bool) -> QATDivergedError:
    """The error for a non-finite loss at global ``step``, naming the layers at fault if any.

    ``here``: whether this process saw the non-finite loss (else another process did).
    """
    layers = non_finite_layers(module)
    if layers:
        where = "fake-quant layers with non-finite step sizes or weights: " + "; ".join(layers)
    elif quantized_layers(module):
        where = "no fake-quant layer has a non-finite step size or weight, so the forward pass itself overflowed" + (
            "" if here else " on another process"
        )
    else:
        where = "the model holds no fake-quant layer"
    return QATDivergedError(
        f"the training loss became non-finite (loss={loss.detach().float().mean().item()}) at global step "
        f"{step} of quantization-aware fine-tuning; {where}. Try a lower learning rate, gradient "
        "clipping (Trainer(gradient_clip_val=...)), or a plan with more bits (a higher compression_ratio)."
    )
