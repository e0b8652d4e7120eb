"""The fake-quant twin of a layer: wraps the original module and calls its own forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ohq_lightning.layers import float_weight, is_weight_pruned
from ohq_lightning.plan import Option
from ohq_lightning.quant.fake_quant import ActivationFakeQuant, FloatCast, WeightFakeQuant

__all__ = ["QuantLayer", "float_weight", "is_weight_pruned"]  # the two helpers live in ohq_lightning.layers


class QuantLayer(nn.Module):
    """A quantizable layer at one option, in fake-quant.

    The original module stays inside as ``module`` with its own ``weight`` :class:`~torch.nn.Parameter`
    (the very same object, so an optimizer built before the swap still trains it). The forward
    fake-quantizes the first input (``input_quantizer``), then calls the original module's own
    forward with a fake-quantized weight, so subclasses that transform their weight (timm's
    ``StdConv2d``) or pad dynamically (``Conv2dSame``) compute what they always did.

    Pruning (:mod:`torch.nn.utils.prune`, Lightning's ``ModelPruning``) works on the wrapped module,
    before or after the wrap: the layer then fake-quantizes the pruned weight
    ``weight_orig * weight_mask`` (pruned entries stay exactly zero: zero is on the symmetric grid),
    gradients reach ``weight_orig`` (zero where masked), and :meth:`strip_plan
    <ohq_lightning.quant.strip_plan>` gives back the pruned module. Prune ``layer.module``, not the
    layer: :attr:`weight` is a computed tensor, not a ``Parameter``, so ``ModelPruning``'s default
    choice of parameters finds the wrapped module's ``weight`` and never this wrapper (nor the
    quantizers' step sizes, whose parameters are named ``log_scale``).

    Args:
        module: the layer to wrap (a supported conv or linear module).
        option: the option name or :class:`~ohq_lightning.plan.Option`, e.g. ``"w4a8"``.
        input_signed: whether the layer's input can be negative; ``None`` decides at calibration.

    Example:
        >>> layer = QuantLayer(torch.nn.Linear(4, 2), "w4a8")
        >>> layer(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(self, module: nn.Module, option: str | Option, input_signed: bool | None = None) -> None:
        super().__init__()
        parsed = option if isinstance(option, Option) else Option.parse(option)
        self.module = module
        self.option = parsed.name
        self.weight_quantizer: nn.Module | None = None
        self.input_quantizer: nn.Module | None = None
        if parsed.is_float:
            if parsed.float_format != "fp32":
                self.weight_quantizer = FloatCast(parsed.float_format)
                self.input_quantizer = FloatCast(parsed.float_format)
        else:
            assert parsed.weight_bits is not None
            self.weight_quantizer = WeightFakeQuant(float_weight(module).detach(), parsed.weight_bits)
            if parsed.act_bits is not None:
                self.input_quantizer = ActivationFakeQuant(parsed.act_bits, signed=input_signed)

    @property
    def weight(self) -> torch.Tensor:
        """The float weight this layer fake-quantizes: the wrapped module's, masked if it is pruned.

        A tensor computed from the wrapped module's parameter (gradients flow to it), not the
        ``Parameter`` itself, so tools that look for ``weight`` parameters (``ModelPruning``) find the
        wrapped module's. Read it; train, load, initialise or prune ``layer.module.weight`` (its
        ``weight_orig`` while pruned).
        """
        weight = float_weight(self.module)
        return weight.view_as(weight) if isinstance(weight, nn.Parameter) else weight

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses (fake-quantized, still in float; pruned entries stay zero)."""
        weight = float_weight(self.module)
        if self.weight_quantizer is None:
            return weight
        return self.weight_quantizer(weight)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's forward on a fake-quantized input with a fake-quantized weight."""
        if self.input_quantizer is not None and args and isinstance(args[0], torch.Tensor):
            args = (self.input_quantizer(args[0]), *args[1:])
        if self.weight_quantizer is None:
            return self.module(*args, **kwargs)
        weight = self.quantized_weight()
        if is_weight_pruned(self.module):
            # the pruning hook sets weight = weight_orig * weight_mask inside the call: feed it the
            # quantized (already masked) weight and a mask of ones, so the call uses exactly ``weight``
            tensors = {"weight_orig": weight, "weight_mask": torch.ones_like(self.module.weight_mask)}
        else:
            tensors = {"weight": weight}
        return functional_call(self.module, tensors, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"option={self.option!r}"
