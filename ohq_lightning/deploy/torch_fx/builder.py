"""Build a plan's int8 deployment on torch's CPU kernels from one traced, fused, calibrated float graph.

The float model is traced once (Identity/Dropout dropped, BatchNorm folded into the convolution
before it, ReLU fused after it by torch's own fusion), put in channels-last layout when 4-D, and its
activation ranges recorded once; every plan is then built from that graph:

* a layer at an integer option with 8-bit activations (``w8a8``, ``w4a8``, ``w2a8``) runs on torch's
  int8 conv/linear kernel: unsigned 8-bit activations (per tensor, full range, no ``reduce_range``),
  signed 8-bit weights per output channel with zero point 0, sub-8-bit weights on their grid inside
  int8 (:class:`~ohq_lightning.deploy.torch_fx.weights.LayerWeight`);
* a float layer stays a float module (BatchNorm folded, like the FP32 reference);
* elementwise and shape ops between layers (add, ReLU, Hardswish, pooling, flatten, the
  squeeze-excite multiply...) **follow their largest input**: an op with one input takes its
  precision; an op with several runs in int8 when its largest input is int8 (among inputs of one
  size, the one computed last), and the others are converted to it. Uniform int8 is then torch's
  normal FX int8 graph, and a mix pays only for the conversions it implies, each depending on two
  layers' precisions (its producer's and its consumer's), which suits an additive latency model.
  One-input ops having their input's precision also keeps clear of a pitfall of FX's lowering (a
  float ReLU/pooling between a dequantize and a quantize turned into an int8 op even when another
  consumer expects float).

Quantization parameters come from the model where it learned them (a fake-quant model: its
per-channel weight steps, scaled by the folded BatchNorm factor, and its input grids; where one
tensor feeds several such layers, the union of their ranges), otherwise from the MSE-optimal
clipping of the folded weight and the min/max observed on the calibration batches. Activations use
the full 8-bit range: exact on CPUs with VNNI, may saturate 16-bit sums on older AVX2-only CPUs.
Measurements behind these choices: ``docs/notes/deploy.md``.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ohq_lightning.deploy.base import check_known_layers, plan_assignment
from ohq_lightning.deploy.learned import learned_input_qparams, qparams_range
from ohq_lightning.deploy.torch_fx.engine import ENGINES, quantized_engine, quiet
from ohq_lightning.deploy.torch_fx.graph import channels_last, first_conv, plain_modules, replace_module, trace_fx
from ohq_lightning.deploy.torch_fx.observers import RangeRecorder, observer_classes
from ohq_lightning.deploy.torch_fx.weights import LayerWeight
from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import Option, QuantPlan
from ohq_lightning.quant.export import learned_quantization
from ohq_lightning.quant.swap import float_copy

__all__ = ["TorchInt8Builder"]


class TorchInt8Builder:
    """Traces, fuses and calibrates a float model once, then builds its int8 deployment for any plan.

    Building a plan copies the fused graph, marks each node int8 or float (see the module
    docstring), inserts observers whose ranges are set from the statistics recorded at
    construction (no calibration pass per plan), and converts.

    Args:
        model: the model (plain, or with a plan applied: then deployed from its float weights with
            its learned step sizes).
        example_inputs: one input batch (one tensor).
        calibration_inputs: batches whose ranges set the activation quantization where no learned
            step exists (default: the example).
        engine: torch's quantized engine (``"x86"``; ``"qnnpack"`` on ARM).

    Example:
        >>> builder = TorchInt8Builder(model, example)  # doctest: +SKIP
        >>> mixed = builder.build({"conv1": "w8a8", "fc": "fp32"})  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        *,
        calibration_inputs: Sequence[torch.Tensor] | None = None,
        engine: str = "x86",
    ) -> None:
        if not isinstance(example_inputs, torch.Tensor):
            raise ValueError(
                f"the torch runtime deploys models called with one input tensor; got a {type(example_inputs).__name__}"
            )
        if engine not in ENGINES:
            raise ValueError(f"unknown quantized engine {engine!r}; available: {list(ENGINES)}")
        self.engine = engine
        self.example_inputs = example_inputs.detach().float().cpu()
        learned = learned_quantization(model)
        float_model = float_copy(model)
        if float_model is model:
            float_model = copy.deepcopy(model)
        float_model = float_model.cpu().float().eval()
        self.layer_names = trace_layers(float_model, self.example_inputs).names()
        originals = {
            name: module.weight.detach().reshape(module.weight.shape[0], -1).clone()
            for name, module in float_model.named_modules()
            if name in self.layer_names
        }
        self.fused = self._fuse(float_model)
        self._layer_nodes: dict[str, list[str]] = {}
        for node in self.fused.graph.nodes:
            if node.op == "call_module" and node.target in self.layer_names:
                self._layer_nodes.setdefault(str(node.target), []).append(node.name)
        self._weights = {
            name: LayerWeight(
                first_conv(self.fused.get_submodule(name)).weight.detach().clone(), originals[name], learned.get(name)
            )
            for name in self._layer_nodes
        }
        self._calibration = [batch.detach().float().cpu() for batch in calibration_inputs or [self.example_inputs]]
        self._ranges: dict[str, tuple[float, float]] = {}
        self._sizes: dict[str, int] = {}  # elements per sample of each tensor
        self._learned_inputs: dict[str, tuple[float, float]] = {}
        for name, found in learned.items():
            qparams = learned_input_qparams(found)
            if qparams is not None and name in self._layer_nodes:
                self._learned_inputs[name] = qparams_range(qparams)

    def _fuse(self, float_model: nn.Module) -> torch.fx.GraphModule:
        """``float_model`` traced and fused by torch's native backend (channels-last when 4-D)."""
        # deferred: torch.ao.quantization is deprecated upstream; only the torch runtime loads it
        from torch.ao.quantization.backend_config import get_native_backend_config
        from torch.ao.quantization.quantize_fx import _fuse_fx

        plain_modules(float_model)
        float_model.eval()
        self._backend = get_native_backend_config()
        with quiet(), torch.no_grad():
            fused = _fuse_fx(trace_fx(float_model, self.example_inputs), False, None, self._backend)
        if self.example_inputs.dim() == 4:
            channels_last(fused)
        return fused

    def _statistics(self) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
        """Each tensor's float range over the calibration batches and its size, recorded on first use."""
        if not self._sizes:
            recorder = RangeRecorder(self.fused, self._ranges, self._sizes)
            with torch.no_grad():
                for batch in self._calibration:
                    recorder.run(batch)
        return self._ranges, self._sizes

    def architecture_key(self) -> str:
        """A hash of the fused graph (ops, wiring, module types and shapes), not of the weight values."""
        digest = hashlib.sha256(self.fused.code.encode())
        for name, module in self.fused.named_modules():
            shapes = [(k, tuple(v.shape)) for k, v in module.state_dict(keep_vars=True).items() if "." not in k]
            digest.update(f"{name}|{type(module).__name__}|{shapes}".encode())
        digest.update(str(tuple(self.example_inputs.shape)).encode())
        return digest.hexdigest()[:20]

    def int8_nodes(self, integer_layers: set[str]) -> set[str]:
        """Names of the fused graph's nodes that run in int8 when ``integer_layers`` do (the rule above)."""
        layer_targets = set(self._layer_nodes)
        int8: set[str] = set()
        order = {node.name: index for index, node in enumerate(self.fused.graph.nodes)}
        sizes = self._statistics()[1]
        for node in self.fused.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op == "call_module" and node.target in layer_targets:
                if node.target in integer_layers:
                    int8.add(node.name)
                continue
            inputs = [arg for arg in node.all_input_nodes if arg.op != "get_attr"]
            if inputs:  # follow the largest input; among equals, the one computed last
                chosen = max(inputs, key=lambda arg: (sizes.get(arg.name, 0), order[arg.name]))
                if chosen.name in int8:
                    int8.add(node.name)
        return int8

    def build(self, plan: QuantPlan | Mapping[str, str]) -> torch.fx.GraphModule:
        """The converted graph module following ``plan`` (layers not named stay float)."""
        assignment = plan_assignment(plan)
        check_known_layers(assignment, self.layer_names)
        integer = {name: Option.parse(option) for name, option in assignment.items() if _check_option(name, option)}
        hidden = sorted(set(integer) - set(self._layer_nodes))
        if hidden:
            raise ValueError(
                f"layers {hidden} are not module calls of the traced graph (their forward was traced through, "
                "e.g. timm's Conv2dSame/StdConv2d): the torch runtime cannot put them on int8 kernels; keep them fp32"
            )
        module = self._with_snapped_weights(integer)
        mapping, scopes = self._qconfigs(module, integer)
        return self._convert(module, mapping, scopes, set(integer))

    def _with_snapped_weights(self, integer: Mapping[str, Option]) -> torch.fx.GraphModule:
        """A new graph module over the fused graph's leaf modules, integer layers on their weight grids.

        FX copies the containers, not the leaves, and conversion replaces leaves in the new containers
        only; integer layers get their own copy, with weights on their grid.
        """
        module = torch.fx.GraphModule(self.fused, copy.deepcopy(self.fused.graph))
        for name, option in integer.items():
            assert option.weight_bits is not None
            snapped, _ = self._weights[name].on_grid(option.weight_bits)
            layer = copy.deepcopy(self.fused.get_submodule(name))
            first_conv(layer).weight = nn.Parameter(snapped.clone(), requires_grad=False)
            replace_module(module, name, layer)
        return module

    def _qconfigs(
        self, module: torch.fx.GraphModule, integer: Mapping[str, Option]
    ) -> tuple[Any, dict[str, tuple[str, type]]]:
        """FX's qconfig mapping (one scope per node, looked up by that name): int8 nodes get observers,
        float nodes none; integer layers' weights use their grid's steps."""
        # deferred: torch.ao.quantization is deprecated upstream; only the torch runtime loads it
        from torch.ao.quantization import QConfig, QConfigMapping
        from torch.ao.quantization.qconfig_mapping import _FIXED_QPARAMS_OP_TO_OBSERVER

        activation, step_observer = observer_classes()
        int8 = self.int8_nodes(set(integer))
        mapping = QConfigMapping()
        scopes: dict[str, tuple[str, type]] = {}
        default_qconfig = QConfig(activation=activation, weight=step_observer)
        for node in module.graph.nodes:
            scope = f"_ohq_{node.name}"
            scopes[node.name] = (scope, type(None))
            qconfig = None
            if node.name in int8:
                if node.op == "call_module" and node.target in integer:
                    _, step = self._weights[str(node.target)].on_grid(integer[str(node.target)].weight_bits)  # type: ignore[arg-type]
                    qconfig = QConfig(activation=activation, weight=step_observer.with_args(step=step))
                else:
                    kind = type(module.get_submodule(node.target)) if node.op == "call_module" else node.target
                    fixed = _FIXED_QPARAMS_OP_TO_OBSERVER.get(kind) if _hashable(kind) else None
                    qconfig = default_qconfig if fixed is None else QConfig(activation=fixed, weight=step_observer)
            if node.op == "call_module":
                mapping.set_module_name(str(node.target), qconfig)
            else:
                mapping.set_module_name(scope, qconfig)
        return mapping, scopes

    def _convert(
        self, module: torch.fx.GraphModule, mapping: Any, scopes: dict[str, tuple[str, type]], integer: set[str]
    ) -> torch.fx.GraphModule:
        """Insert observers, set their ranges and convert to quantized modules on this builder's engine."""
        # deferred: torch.ao.quantization is deprecated upstream; only the torch runtime loads it
        from torch.ao.quantization.fx.prepare import prepare
        from torch.ao.quantization.fx.utils import assert_and_get_unique_device
        from torch.ao.quantization.quantize_fx import convert_fx

        try:
            with quiet(), quantized_engine(self.engine), torch.no_grad():
                prepared = prepare(
                    module, mapping, False, scopes, example_inputs=(self.example_inputs,), backend_config=self._backend
                )
                self._set_ranges(prepared, observer_classes()[0], integer)
                return convert_fx(prepared, backend_config=self._backend)
        finally:
            # torch memoizes this per module object (functools.cache), so every graph FX builds would
            # stay alive: ~10 MB per plan of MobileNetV3-large, gigabytes over a profile.
            cache_clear = getattr(assert_and_get_unique_device, "cache_clear", None)
            if cache_clear is not None:
                cache_clear()

    def _set_ranges(self, prepared: torch.fx.GraphModule, range_observer: type, integer: set[str]) -> None:
        """Give every activation observer the range recorded for the tensor it observes (or a learned step)."""
        modules = dict(prepared.named_modules())
        observed: dict[int, tuple[nn.Module, list[str], list[tuple[float, float]]]] = {}
        for node in prepared.graph.nodes:
            observer = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(observer, range_observer):
                continue
            source = node.args[0]
            while source.op == "call_module" and isinstance(modules.get(source.target), range_observer):
                source = source.args[0]
            _, names, learned = observed.setdefault(id(observer), (observer, [], []))
            names.append(source.name)
            for user in node.users:
                if user.op == "call_module" and user.target in integer and user.target in self._learned_inputs:
                    learned.append(self._learned_inputs[str(user.target)])
        for observer, names, learned in observed.values():
            if learned:
                low, high = min(w[0] for w in learned), max(w[1] for w in learned)
            else:
                ranges = self._statistics()[0]
                windows = [ranges[n] for n in names if n in ranges]
                if not windows:
                    raise RuntimeError(f"no recorded range for the tensors {names}")
                low, high = min(w[0] for w in windows), max(w[1] for w in windows)
            observer.min_val, observer.max_val = float(low), float(high)


def _check_option(name: str, option: str) -> bool:
    """Whether ``option`` runs on the int8 kernel (True) or in float (False); other options are refused."""
    parsed = Option.parse(option)
    if parsed.is_float and parsed.float_format == "fp32":
        return False
    if not parsed.is_float and parsed.act_bits == 8:
        return True
    raise ValueError(
        f"layer {name!r}: option {parsed.name!r} cannot run on torch's CPU kernels, which offer fp32 and integer "
        "options with 8-bit activations (w8a8, w4a8, w2a8; sub-8-bit weights run on the 8-bit kernel)"
    )


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
