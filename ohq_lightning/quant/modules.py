"""The fake-quant twin of a layer: wraps the original module and calls its own forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ohq_lightning.plan import Option
from ohq_lightning.quant.fake_quant import ActivationFakeQuant, FloatCast, WeightFakeQuant

__all__ = ["QuantLayer"]


class QuantLayer(nn.Module):
    """A quantizable layer at one option, in fake-quant.

    The original module stays inside as ``module`` with its own ``weight`` :class:`~torch.nn.Parameter`
    (the very same object, so an optimizer built before the swap still trains it). The forward
    fake-quantizes the first input (``input_quantizer``), then calls the original module's own
    forward with a fake-quantized weight, so subclasses that transform their weight (timm's
    ``StdConv2d``) or pad dynamically (``Conv2dSame``) compute what they always did.

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
            self.weight_quantizer = WeightFakeQuant(module.weight, parsed.weight_bits)
            if parsed.act_bits is not None:
                self.input_quantizer = ActivationFakeQuant(parsed.act_bits, signed=input_signed)

    @property
    def weight(self) -> nn.Parameter:
        """The original (float) weight parameter of the wrapped module."""
        return self.module.weight

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses (fake-quantized, still in float)."""
        if self.weight_quantizer is None:
            return self.module.weight
        return self.weight_quantizer(self.module.weight)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's forward on a fake-quantized input with a fake-quantized weight."""
        if self.input_quantizer is not None and args and isinstance(args[0], torch.Tensor):
            args = (self.input_quantizer(args[0]), *args[1:])
        if self.weight_quantizer is None:
            return self.module(*args, **kwargs)
        return functional_call(self.module, {"weight": self.quantized_weight()}, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"option={self.option!r}"
