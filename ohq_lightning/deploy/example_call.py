"""A model called with exactly the arguments of its example input: what every export and trace is given.

Exporters and tracers read a module's signature, not how the user calls it: the legacy ONNX exporter
passes every defaulted argument positionally (a keyword-only one breaks the call, a positional one
becomes a graph input nobody feeds), and FX makes each argument a placeholder. :class:`ExampleCall`
has one argument, the example's tensors, and calls the model with them where the example put them,
so the model's defaults stay its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ohq_lightning.layers import ExampleInputs

__all__ = ["ExampleCall"]


class ExampleCall(nn.Module):
    """``model`` called the way ``example_inputs`` calls it, with the example's tensors as its one input.

    ``example_inputs`` is a tensor, a tuple or list of positional arguments, or a dict of keywords;
    its tensors are this module's input (:attr:`example_inputs`: the tensor alone when there is one,
    else a tuple in order), and its other values are passed as they are on every call.

    The wrapper holds the model's children, parameters and buffers under the model's own names; the
    model itself is not a child. ONNX node scopes, FX module paths and state-dict keys are then the
    user's layer names, with no prefix. Nothing of ``model`` is changed.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> call = ExampleCall(net, torch.zeros(1, 4))
        >>> list(call.state_dict()) == list(net.state_dict())
        True
    """

    def __init__(self, model: nn.Module, example_inputs: ExampleInputs) -> None:
        super().__init__()
        # Written into the wrapper's own registries, not through add_module/register_*: those refuse a
        # name that is also an attribute of this class, and the user's names must stay as they are.
        for name, child in model.named_children():
            self._modules[name] = child
        for name, parameter in model.named_parameters(recurse=False):
            self._parameters[name] = parameter
        for name, buffer in model.named_buffers(recurse=False):
            self._buffers[name] = buffer
        if isinstance(example_inputs, dict):
            args, kwargs = [], dict(example_inputs)
        elif isinstance(example_inputs, (tuple, list)):
            args, kwargs = list(example_inputs), {}
        else:
            args, kwargs = [example_inputs], {}
        slots = [(False, i) for i, value in enumerate(args) if isinstance(value, torch.Tensor)]
        slots += [(True, key) for key, value in kwargs.items() if isinstance(value, torch.Tensor)]
        if not slots:
            raise ValueError("the example input holds no tensor: nothing to export or trace")
        # Plain attributes (object.__setattr__): the model must not become a registered child.
        object.__setattr__(self, "_ohq_model", model)
        object.__setattr__(self, "_ohq_call", (args, kwargs, slots))

    @property
    def wrapped_model(self) -> nn.Module:
        """The user's model, which this module calls."""
        return self._ohq_model

    @property
    def example_inputs(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """This module's input for the example: its one tensor, or a tuple of its tensors in order."""
        args, kwargs, slots = self._ohq_call
        tensors = tuple(kwargs[where] if keyword else args[where] for keyword, where in slots)
        return tensors[0] if len(tensors) == 1 else tensors

    def forward(self, x: Any) -> Any:
        """The model called with the example's arguments, its tensors replaced by ``x`` (a tensor or tuple).

        Tensors are picked out of a tuple by index, never by iterating, so FX can trace it.
        """
        args, kwargs, slots = self._ohq_call
        args, kwargs = list(args), dict(kwargs)
        for index, (keyword, where) in enumerate(slots):
            value = x if len(slots) == 1 else x[index]
            if keyword:
                kwargs[where] = value
            else:
                args[where] = value
        return self._ohq_model(*args, **kwargs)
