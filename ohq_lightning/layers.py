"""Find the quantizable layers of a model and trace their shapes with one forward pass.

Also the helpers every stage uses to read a layer's weight, pruned (:mod:`torch.nn.utils.prune`) or
not: :func:`is_weight_pruned`, :func:`weight_parameter` and :func:`float_weight`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from ohq_lightning.plan import LayerInfo

__all__ = [
    "LayerTrace",
    "float_weight",
    "is_weight_pruned",
    "preserved_state",
    "quantizable_types",
    "run_model",
    "trace_layers",
    "weight_parameter",
]

_UNSUPPORTED = (
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Bilinear,
    nn.MultiheadAttention,
)

ExampleInputs = Any  # a tensor, a tuple/list of positional tensors, or a dict of keyword tensors


def quantizable_types() -> tuple[type[nn.Module], ...]:
    """Module types that can be quantized, matched exactly (subclasses may change ``forward``).

    ``nn.Conv2d`` (plain, grouped, depthwise), ``nn.Linear``, and timm's subclasses whose
    forward still computes one convolution or matrix product of the module's ``weight``
    (``Conv2dSame``, ``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d``,
    ``ScaledStdConv2dSame``, ``timm.layers.Linear``). The fake-quant wrapper calls each
    module's own forward with a quantized weight, so what they compute is unchanged.
    """
    types: list[type[nn.Module]] = [nn.Conv2d, nn.Linear]
    try:
        from timm import layers as timm_layers
    except ImportError:  # pragma: no cover - timm is a dependency, but keep the core usable without it
        return tuple(types)
    for name in ("Conv2dSame", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame", "Linear"):
        module_type = getattr(timm_layers, name, None)
        if isinstance(module_type, type) and module_type not in types:
            types.append(module_type)
    return tuple(types)


def is_weight_pruned(module: nn.Module) -> bool:
    """Whether :mod:`torch.nn.utils.prune` re-parametrises ``module.weight`` (as Lightning's ``ModelPruning`` does).

    A pruned module holds ``weight_orig`` (the trained :class:`~torch.nn.Parameter`) and
    ``weight_mask`` (a buffer), and a forward pre-hook sets ``module.weight = weight_orig * weight_mask``
    at every call; between calls ``module.weight`` is whatever the last call left there.

    Example:
        >>> from torch.nn.utils import prune
        >>> conv = torch.nn.Conv2d(3, 4, 3)
        >>> _ = prune.l1_unstructured(conv, "weight", amount=0.5)
        >>> is_weight_pruned(conv)
        True
    """
    if "weight_orig" not in module._parameters or "weight_mask" not in module._buffers:
        return False
    return any(
        isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == "weight"
        for hook in module._forward_pre_hooks.values()
    )


def weight_parameter(module: nn.Module) -> nn.Parameter | None:
    """The :class:`~torch.nn.Parameter` behind ``module``'s weight: ``weight_orig`` when pruned, else ``weight``.

    It has the weight's shape; editing it in place changes what the next forward computes (a pruned
    module's ``weight`` attribute is recomputed from it at every call). None when the weight is no
    parameter at all (e.g. a plain tensor attribute).
    """
    if is_weight_pruned(module):
        return module.weight_orig
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None


def float_weight(module: nn.Module) -> torch.Tensor:
    """The float weight ``module`` computes with now: ``weight_orig * weight_mask`` when pruned, else ``weight``.

    Computed afresh from the parameter (never the value a pruned module's last call left behind),
    so gradients reach ``weight_orig``.
    """
    if is_weight_pruned(module):
        orig = module.weight_orig
        return module.weight_mask.to(dtype=orig.dtype) * orig
    return module.weight


def run_model(model: nn.Module, inputs: ExampleInputs) -> Any:
    """Call ``model`` with ``inputs`` (a tensor, a tuple/list of arguments, or a dict of keywords)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a (possibly nested) output, e.g. the logits of a model."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run a block with ``model`` in eval mode and no grad, restoring each module's mode after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


@dataclass
class LayerTrace:
    """What :func:`trace_layers` found: the quantizable layers, and what it left in float and why."""

    layers: list[LayerInfo]
    skipped: dict[str, str] = field(default_factory=dict)
    batch_size: int = 1

    def names(self) -> list[str]:
        """Names of the quantizable layers, in the order of the forward pass."""
        return [layer.name for layer in self.layers]


@dataclass
class _Record:
    in_shape: list[int]
    out_shape: list[int]
    macs: int = 0
    calls: int = 0
    nonnegative: bool = True
    order: int = 0


def _macs(module: nn.Module, weight: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        per_output = weight.shape[1] * weight.shape[2] * weight.shape[3]  # in_channels/groups * kh * kw
        return out.numel() * per_output
    return out.numel() * weight.shape[1]


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        if module.groups == 1:
            return "conv"
        if module.groups == module.in_channels:
            return "depthwise"
        return "grouped"
    return "linear"


def _batch_size(inputs: ExampleInputs) -> int:
    tensor = first_tensor(list(inputs.values()) if isinstance(inputs, dict) else inputs)
    if tensor is None or tensor.dim() == 0:
        return 1
    return int(tensor.shape[0])


def _per_sample(shape: torch.Size, batch: int) -> list[int]:
    dims = list(shape)
    if dims and dims[0] == batch:
        dims[0] = 1
    return dims


def trace_layers(model: nn.Module, example_inputs: ExampleInputs) -> LayerTrace:
    """Find the quantizable layers of ``model`` and trace them with one forward of ``example_inputs``.

    Shapes are recorded with the batch dimension set to 1 and MACs are per sample. A module
    called more than once in a forward is one layer (one precision) whose MACs add up over its
    calls. Layers the project cannot quantize (other conv types, unknown subclasses of
    ``nn.Conv2d``/``nn.Linear``, weights shared between modules, layers the forward never
    reaches) are listed in ``skipped`` with the reason and stay float. Layers pruned with
    :mod:`torch.nn.utils.prune` are quantizable like any other: their parameter is ``weight_orig``
    (see :func:`weight_parameter`), with the same shape and MACs. The model is run in eval mode
    without gradients and is left exactly as it was.

    Raises:
        ValueError: if the example input does not run, or the model has no quantizable layer.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 2))
        >>> [layer.name for layer in trace_layers(model, torch.randn(1, 3, 8, 8)).layers]
        ['0', '2']
    """
    candidates, weights, skipped = _find_candidates(model)
    batch = _batch_size(example_inputs)
    records = _record_forward(model, example_inputs, candidates, weights, batch)
    layers: list[LayerInfo] = []
    for name, module in candidates.items():
        record = records.get(name)
        if record is None:
            skipped[name] = "not called in the forward pass of the example input"
            continue
        layers.append(_layer_info(name, module, weights[name], record))
    layers.sort(key=lambda layer: records[layer.name].order)
    if not layers:
        detail = f" (left in float: {skipped})" if skipped else ""
        raise ValueError(
            "the model has no quantizable layer: expected nn.Conv2d or nn.Linear modules (or timm's "
            f"conv/linear layers) reached by the forward pass{detail}"
        )
    return LayerTrace(layers=layers, skipped=skipped, batch_size=batch)


def _find_candidates(
    model: nn.Module,
) -> tuple[dict[str, nn.Module], dict[str, nn.Parameter], dict[str, str]]:
    """The modules that may be quantized with their weight parameters, and the modules left float with why."""
    supported = quantizable_types()
    candidates: dict[str, nn.Module] = {}
    weights: dict[str, nn.Parameter] = {}
    skipped: dict[str, str] = {}
    weight_owner: dict[int, str] = {}
    for name, module in model.named_modules():
        if type(module) in supported:
            weight = weight_parameter(module)
            if weight is None:
                skipped[name] = "weight is not a Parameter"
                continue
            if id(weight) in weight_owner:
                skipped[name] = f"weight is shared with {weight_owner[id(weight)]!r}"
                continue
            weight_owner[id(weight)] = name
            candidates[name] = module
            weights[name] = weight
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            skipped[name] = f"{type(module).__name__} subclasses {_base_name(module)} with its own forward"
        elif isinstance(module, _UNSUPPORTED):
            skipped[name] = f"{type(module).__name__} is not supported"
    return candidates, weights, skipped


def _record_forward(
    model: nn.Module,
    example_inputs: ExampleInputs,
    candidates: dict[str, nn.Module],
    weights: dict[str, nn.Parameter],
    batch: int,
) -> dict[str, _Record]:
    """Run one forward with a hook on each candidate; what each hook saw, by name (modules never called are absent)."""
    records: dict[str, _Record] = {}
    handles = [
        module.register_forward_hook(_recording_hook(name, weights[name], batch, records))
        for name, module in candidates.items()
    ]
    try:
        with preserved_state(model):
            run_model(model, example_inputs)
    except Exception as error:  # the user's model raised: report it as bad input
        raise ValueError(
            f"the example input does not run through the model: {type(error).__name__}: {error}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return records


def _recording_hook(
    name: str, weight: nn.Parameter, batch: int, records: dict[str, _Record]
) -> Callable[[nn.Module, tuple, Any], None]:
    """A forward hook adding one call of module ``name`` (per-sample shapes, MACs, sign of input) to ``records``."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        out = output if isinstance(output, torch.Tensor) else None
        if inp is None or out is None:
            return
        record = records.get(name)
        if record is None:
            record = records[name] = _Record(
                _per_sample(inp.shape, batch), _per_sample(out.shape, batch), order=len(records)
            )
        record.calls += 1
        record.macs += _macs(module, weight, out) // max(batch, 1)
        record.nonnegative = record.nonnegative and bool(inp.numel() == 0 or inp.min() >= 0)

    return hook


def _layer_info(name: str, module: nn.Module, weight: nn.Parameter, record: _Record) -> LayerInfo:
    """The :class:`~ohq_lightning.plan.LayerInfo` of a traced module."""
    bias = getattr(module, "bias", None)
    return LayerInfo(
        name=name,
        type=f"{type(module).__module__}.{type(module).__qualname__}",
        kind=_kind(module),
        in_shape=record.in_shape,
        out_shape=record.out_shape,
        weight_shape=list(weight.shape),
        weight_numel=weight.numel(),
        bias_numel=bias.numel() if isinstance(bias, torch.Tensor) else 0,
        macs=int(record.macs),
        calls=record.calls,
        groups=int(getattr(module, "groups", 1)),
        input_nonnegative=record.nonnegative,
        **_conv_geometry(module, record),
    )


def _conv_geometry(module: nn.Module, record: _Record) -> dict[str, list[int]]:
    """Stride, dilation and the explicit padding (top, left, bottom, right) the convolution really uses.

    'same' padding (``padding="same"`` or timm's dynamic ``Conv2dSame``) is resolved from the traced
    input shape, so the padding recorded is what an exported graph would carry.
    """
    if not isinstance(module, nn.Conv2d):
        return {}
    stride, dilation = list(module.stride), list(module.dilation)
    kernel = list(module.kernel_size)
    dynamic_same = type(module).__name__.endswith("Same")
    if dynamic_same or module.padding == "same":
        pads = []
        for size, k, s, d in zip(record.in_shape[-2:], kernel, stride, dilation, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        padding = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]
    elif module.padding == "valid":
        padding = [0, 0, 0, 0]
    else:
        top, left = module.padding
        padding = [top, left, top, left]
    return {"stride": stride, "padding": padding, "dilation": dilation}


def _base_name(module: nn.Module) -> str:
    return "nn.Conv2d" if isinstance(module, nn.Conv2d) else "nn.Linear"
