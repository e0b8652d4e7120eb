"""A float model as the FX graph torch's int8 backend can convert: traced, normalised, channels-last."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ohq_lightning.deploy.example_call import ExampleCall

__all__ = ["channels_last", "first_conv", "plain_modules", "replace_module", "trace_fx"]

_DROPPED = (nn.Identity, nn.Dropout)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` inside ``root``."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def plain_modules(model: nn.Module) -> None:
    """Rewrite, in place, timm modules FX cannot quantize into their plain torch equivalents.

    ``timm.layers.Linear`` (an ``nn.Linear`` whose forward is ``F.linear``) becomes ``nn.Linear``;
    ``BatchNormAct2d`` (BatchNorm, dropout and activation in one module, traced as a functional
    batch_norm that cannot be folded) becomes ``Sequential(BatchNorm2d, drop, act)``. Both share the
    original parameters and compute the same in eval mode.
    """
    for name, module in list(model.named_modules()):
        if not name:
            continue
        kind = type(module)
        if kind is not nn.Linear and isinstance(module, nn.Linear) and kind.__module__.startswith("timm."):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight, plain.bias = module.weight, module.bias
            replace_module(model, name, plain)
        elif (
            kind is not nn.BatchNorm2d
            and isinstance(module, nn.BatchNorm2d)
            and isinstance(getattr(module, "act", None), nn.Module)
            and isinstance(getattr(module, "drop", None), nn.Module)
        ):
            norm = nn.BatchNorm2d(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
            )
            norm.load_state_dict(
                {k: v for k, v in module.state_dict().items() if not k.startswith(("act.", "drop."))}, strict=False
            )
            replace_module(model, name, nn.Sequential(norm, module.drop, module.act))


def trace_fx(model: nn.Module, example_inputs: torch.Tensor) -> torch.fx.GraphModule:
    """The model called with ``example_inputs`` as an FX graph (torch's quantization tracer), normalised for
    FX's int8 backend.

    The traced module is :class:`~ohq_lightning.deploy.example_call.ExampleCall`: one placeholder, the
    example's tensor; the model's other arguments keep their defaults, and module paths are the model's
    own. Identity/Dropout nodes are dropped; ``nn.Flatten``, ``x.flatten()`` and ``torch.relu`` become
    ``torch.flatten`` and ``F.relu``, which FX's int8 backend runs on uint8 (the others would cost a
    dequantize/quantize pair). A model that cannot be traced is a ``ValueError`` naming the module.
    """
    call = ExampleCall(model, example_inputs)
    tracer = _tracer(call)
    try:
        graph = tracer.trace(call)
    except Exception as error:  # any tracing failure becomes one clear error
        where = tracer.failed_in or "<top level>"
        raise ValueError(
            f"the torch runtime cannot deploy {type(model).__name__}: torch.fx could not trace it, in module "
            f"{where!r} ({type(error).__name__}: {error}). Deploy it with the onnxruntime runtime, or make that "
            "forward traceable (no data-dependent Python control flow)"
        ) from error
    module = torch.fx.GraphModule(call, graph)
    _normalise(module)
    return module


def _tracer(call: ExampleCall) -> Any:
    """torch's quantization tracer, which traces through ``call``'s model as the root (path ``""``) and
    remembers the innermost module a tracing error came from (``failed_in``)."""
    # deferred: torch.ao.quantization is deprecated upstream; only the torch runtime loads it
    from torch.ao.quantization.fx.tracer import QuantizationTracer

    class Tracer(QuantizationTracer):
        failed_in: str | None = None

        def path_of_module(self, mod: nn.Module) -> str:
            return "" if mod is call.wrapped_model else super().path_of_module(mod)

        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            return m is not call.wrapped_model and super().is_leaf_module(m, module_qualified_name)

        def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:
                if self.failed_in is None:  # the innermost module sees the error first
                    self.failed_in = self.path_of_module(m)
                raise

    return Tracer([], [])


def _normalise(module: torch.fx.GraphModule) -> None:
    """Drop Identity/Dropout nodes and turn flatten/relu variants into the forms FX's int8 backend runs."""
    for node in list(module.graph.nodes):
        target = module.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(target, _DROPPED):
            node.replace_all_uses_with(node.args[0])
            module.graph.erase_node(node)
        elif isinstance(target, nn.Flatten) or (node.op == "call_method" and node.target == "flatten"):
            args = (node.args[0], target.start_dim, target.end_dim) if target is not None else node.args
            with module.graph.inserting_before(node):
                flat = module.graph.call_function(torch.flatten, tuple(args), dict(node.kwargs))
            node.replace_all_uses_with(flat)
            module.graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.relu:
            node.target = nn.functional.relu
    module.graph.lint()
    module.recompile()


def channels_last(module: torch.fx.GraphModule) -> None:
    """Put a 4-D model in channels-last layout, in place: its conv weights, and its input on entry.

    torch's int8 kernels produce channels-last (NHWC) tensors, so a float layer after a dequantize
    sees NHWC: with NCHW weights that ran slower, and an add of an NHWC and an NCHW tensor slower
    still, which made a plan's cost depend on where the first int8 layer sits. Channels-last
    throughout avoids that, and was the faster FP32 graph too (``docs/notes/deploy.md``).
    """
    module.to(memory_format=torch.channels_last)
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "placeholder":
            with graph.inserting_after(node):
                converted = graph.call_method("contiguous", (node,), {"memory_format": torch.channels_last})
            node.replace_all_uses_with(converted, delete_user_cb=lambda user, new=converted: user is not new)
    graph.lint()
    module.recompile()


def first_conv(module: nn.Module) -> nn.Module:
    """The conv/linear inside a fused module (``ConvReLU2d`` -> its ``Conv2d``), or the module itself."""
    # deferred: torch.ao.quantization is deprecated upstream; only the torch runtime loads it
    from torch.ao.nn.intrinsic import _FusedModule

    return module[0] if isinstance(module, _FusedModule) else module
