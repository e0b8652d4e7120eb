"""Swap a model's layers for their fake-quant twins according to a plan, and back."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from ohq_lightning._util.progress import progress_bar
from ohq_lightning.layers import preserved_state, quantizable_types, run_model
from ohq_lightning.plan import Option, QuantPlan
from ohq_lightning.quant.fake_quant import ActivationFakeQuant
from ohq_lightning.quant.modules import QuantLayer, float_weight

__all__ = ["apply_plan", "calibrate", "deployable_copy", "float_copy", "quantized_layers", "strip_plan"]


def _assignment(plan: QuantPlan | Mapping[str, str]) -> dict[str, str]:
    if isinstance(plan, QuantPlan):
        return dict(plan.assignment)
    if isinstance(plan, Mapping):
        return dict(plan)
    raise ValueError(f"plan must be a QuantPlan or a mapping of layer name to option, got {type(plan).__name__}")


def _references(model: nn.Module, target: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (parent, attribute) through which ``model`` holds ``target`` (a module may be shared)."""
    found = []
    for parent in model.modules():
        for attr, child in parent._modules.items():  # named_children() would hide the second reference
            if child is target:
                found.append((parent, attr))
    return found


def quantized_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The fake-quant layers of ``model``, by the name of the layer they replaced."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLayer)}


def apply_plan(
    model: nn.Module, plan: QuantPlan | Mapping[str, str], *, input_signed: Mapping[str, bool] | None = None
) -> nn.Module:
    """Swap, in place, every layer the plan quantizes for a :class:`QuantLayer` at its option.

    Float options (``fp32``) leave the layer untouched. The original weight ``Parameter`` objects
    stay in the model, so an optimizer built before or after the swap trains the same tensors.
    The whole plan is checked before anything changes: on error the model is as it was.

    Args:
        model: the model to quantize (changed in place and returned).
        plan: a :class:`~ohq_lightning.plan.QuantPlan` or a mapping of layer name to option name.
        input_signed: optional layer name -> whether its input can be negative (otherwise decided
            at calibration).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> _ = apply_plan(model, {"0": "w8a8", "2": "w4a8"})
        >>> sorted(quantized_layers(model))
        ['0', '2']
    """
    assignment = _assignment(plan)
    supported = quantizable_types()
    modules = dict(model.named_modules())
    missing = [name for name in assignment if name not in modules]
    if missing:
        raise ValueError(
            f"the plan names {len(missing)} layer(s) the model does not have (a plan for another model?): {missing}"
        )
    swaps: list[tuple[str, nn.Module, Option]] = []
    for name, option_name in assignment.items():
        option = Option.parse(option_name)
        module = modules[name]
        if isinstance(module, QuantLayer):
            raise ValueError(f"layer {name!r} is already quantized: call strip_plan(model) before applying a new plan")
        if type(module) not in supported:
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, which cannot be quantized")
        if option.is_float and option.float_format == "fp32":
            continue
        swaps.append((name, module, option))
    signs = dict(input_signed or {})
    wrappers = [(module, _wrap(module, option, signs.get(name))) for name, module, option in swaps]
    for module, wrapper in wrappers:  # every wrapper is built before the first swap
        _replace(model, module, wrapper)
    return model


def _wrap(module: nn.Module, option: Option, input_signed: bool | None) -> QuantLayer:
    wrapper = QuantLayer(module, option, input_signed=input_signed)
    wrapper.to(device=float_weight(module).device)
    wrapper.train(module.training)
    return wrapper


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent, attr in _references(model, old):
        setattr(parent, attr, new)


def strip_plan(model: nn.Module, names: Iterable[str] | None = None) -> nn.Module:
    """Replace :class:`QuantLayer` modules in ``model`` by the plain modules they wrap (in place).

    Args:
        model: the model to strip (changed in place and returned).
        names: the layers to strip (any name a shared layer has will do); ``None`` strips them all.
            Every name is checked before anything changes.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> _ = strip_plan(apply_plan(model, {"0": "w8a8", "2": "w4a8"}), ["2"])
        >>> sorted(quantized_layers(model))
        ['0']
    """
    if names is None:
        wrappers = list(quantized_layers(model).values())
    else:
        wrappers = [_quant_layer(model, name) for name in names]
    for wrapper in wrappers:
        _replace(model, wrapper, wrapper.module)
    return model


def float_copy(model: nn.Module) -> nn.Module:
    """The model with every fake-quant layer replaced by the float layer it wraps (a copy if needed).

    A model without fake-quant layers is returned as it is, so callers can trace or export the float
    network of any model without paying for a copy when there is nothing to strip.
    """
    if not quantized_layers(model):
        return model
    return strip_plan(copy.deepcopy(model))


def deployable_copy(model: nn.Module, *, strip: bool = False) -> nn.Module:
    """A copy of ``model`` to deploy or export: pruning made permanent, fake-quant layers kept or stripped.

    Every :mod:`torch.nn.utils.prune` re-parametrisation (``ModelPruning`` with
    ``make_pruning_permanent=False``, or pruning applied by hand) is removed from the copy, so a
    pruned weight is a plain ``Parameter`` holding its masked values (and a fake-quant layer's
    learned step sizes still apply to it). ``model`` is not changed. A plain :func:`copy.deepcopy`
    refuses a pruned model after a training forward (the masked weight the pruning hook left on the
    module is not a graph leaf); this copy does not.

    Args:
        model: the model (with or without a plan applied, pruned or not).
        strip: also replace the fake-quant layers by the float layers they wrap (:func:`strip_plan`).

    Example:
        >>> conv = torch.nn.Conv2d(3, 4, 3)
        >>> _ = prune.l1_unstructured(conv, "weight", amount=0.5)
        >>> model = apply_plan(torch.nn.Sequential(conv), {"0": "w4a8"})
        >>> copied = deployable_copy(model, strip=True)
        >>> type(copied[0]).__name__, float((copied[0].weight == 0).float().mean())
        ('Conv2d', 0.5)
    """
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for module in model.modules():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    stale = module.__dict__.get(hook._tensor_name)
                    if isinstance(stale, torch.Tensor):  # what the last call left: copy a fresh, detached value
                        memo[id(stale)] = hook.apply_mask(module).detach()
        copied = copy.deepcopy(model, memo)
        for module in copied.modules():
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, prune.BasePruningMethod):
                    hook.remove(module)
                    del module._forward_pre_hooks[key]
    return strip_plan(copied) if strip else copied


def _quant_layer(model: nn.Module, name: str) -> QuantLayer:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, QuantLayer):
        raise ValueError(f"layer {name!r} is not a fake-quant layer of the model, so it cannot be stripped")
    return module


def calibrate(model: nn.Module, batches: Iterable[Any], *, progress: bool = True) -> int:
    """Set the activation step sizes of ``model``'s fake-quant layers from ``batches`` of inputs.

    Each batch is what the model is called with (a tensor, a tuple of arguments or a dict of
    keywords). Quantizers pass activations through in float while they observe, but weight
    fake-quant stays on: each layer's input is observed with the weights upstream already
    fake-quantized and the activations upstream in float. Runs in eval mode without gradients
    and restores the mode after. Returns the number of batches seen.
    """
    quantizers = [m for m in model.modules() if isinstance(m, ActivationFakeQuant)]
    count = 0
    for quantizer in quantizers:
        quantizer.observe()
    try:
        with preserved_state(model):
            for batch in progress_bar(batches, desc="calibrating activation ranges", enabled=progress):
                run_model(model, batch)
                count += 1
    finally:
        for quantizer in quantizers:
            quantizer.finish()
    if count == 0 and quantizers:
        raise ValueError("calibrate() got no batches")
    return count
