"""Deploy a plan to torch's own int8 CPU kernels (x86/fbgemm, or qnnpack on ARM) through torch.fx.

This is the only module that uses torch's FX graph-mode quantization (``torch.ao.quantization``,
deprecated upstream; its warnings are silenced here and nowhere else). The float model is
traced once, Identity/Dropout nodes are dropped, BatchNorm is folded into the convolution before
it and ReLU fused after it (torch's own fusion); every plan is then built from that one fused
graph:

* a layer at an integer option with 8-bit activations (``w8a8``, ``w4a8``, ``w2a8``) runs on
  torch's int8 conv/linear kernel: unsigned 8-bit activations (per tensor, full range, no
  ``reduce_range``), signed 8-bit weights per output channel with zero point 0. A ``w{b}`` option
  with b < 8 stores its weights **on its b-bit grid inside int8**: the folded weight is rounded to
  ``[-2^(b-1), 2^(b-1)-1]`` steps before torch quantizes it with exactly those steps (a plain
  observer with a narrow ``quant_min``/``quant_max`` would not do: torch clamps to the int8 range
  only, so the largest weight could land one step outside the grid). A channel whose folded
  BatchNorm scale is negative stores the mirrored grid ``[-(2^(b-1)-1), 2^(b-1)]``: the same
  2^b levels, the same values as the fake-quant model.
* a float layer stays a float module (BatchNorm folded, like the FP32 reference);
* quantize/dequantize sit exactly where the precision changes;
* a 4-D model runs channels-last throughout (weights, and the input converted on entry): torch's
  int8 kernels produce NHWC tensors, and a float layer or add meeting NHWC data with NCHW weights
  or operands ran slower, so that a mix's cost depended on where its first int8 layer sat (on
  ResNet-18 the additive latency fit then missed by up to 29%; channels-last: within 5%).

**Elementwise and shape ops between layers** (add, ReLU, Hardswish, pooling, mean, flatten, the
squeeze-excite multiply, ...) **follow their largest input**: an op with one tensor input takes
its precision; an op with several (add, multiply) runs in int8 when its largest input is int8 --
among inputs of one size, the one computed last -- and the other inputs are converted to it. (An
op torch has no int8 kernel for stays float whatever its inputs.) So uniform int8 is torch's
normal FX int8 graph (quantized add/add-ReLU/mul/Hardswish, pooling on uint8), and a mix pays for
the conversions it implies, converting the cheaper side: a float squeeze-excite gate is quantized
(a few values per channel) rather than the activation it scales dequantized, and a float layer
in a residual stream converts its own branch at the add instead of turning every later add of
the stream to float, as "int8 only when every input is int8" did. No conversion cascades: each
depends on the precisions of two layers only, its producer's and its consumer's, which suits the
additive latency model of :class:`~ohq_lightning.hardware.CPUTarget` (per-layer deltas plus
transitions between consecutive layers) better.
Measured at 1x3x224x224, 1 thread, interleaved medians (a shared, busy machine: read the ratios to
the FP32 graph -- float FX graph, BatchNorm folded, channels-last -- not the milliseconds):

============================================  ==========  ===================
graph                                         ResNet-18   MobileNetV3-large
============================================  ==========  ===================
FP32 graph                                    1.00        1.00
eager FP32 model                              1.30        1.28
torch's default FX int8 (``prepare_fx``)      0.32        1.38 (BatchNormAct2d stays a float batch_norm)
uniform int8, this rule                       0.27        0.73
uniform int8, ops between layers in float     0.33        0.79
random half-int8 mix, this rule               0.77        0.99
... int8 only when every input is int8        0.77        0.98
... ops between layers in float               0.78        0.95
SE convs float, rest int8, this rule          --          0.76
... int8 only when every input is int8        --          0.78
============================================  ==========  ===================

The rule also keeps clear of a pitfall of FX's lowering, which turns a float ReLU/pooling fed by a
dequantize and feeding a quantize into an int8 op even when another consumer expects float: a
one-input op here always has its input's precision.

Quantization parameters come, in order of preference, from the model itself and then from
calibration:

* a model holding fake-quant layers (a plan applied, maybe fine-tuned) is deployed from its float
  weights (a stripped copy; the model is not changed) with the step sizes it learned
  (:func:`~ohq_lightning.quant.learned_quantization`): per-channel weight steps (scaled by the
  folded BatchNorm factor) and each layer's input step (unsigned grid: zero point 0; signed grid
  ``[-128, 127]``: zero point 128 on torch's uint8). Where one tensor feeds several layers with
  learned steps, its grid covers the union of their ranges (no clipping: the largest step);
* otherwise weight steps are the MSE-optimal clipping of the folded weight (as the fake-quant
  modules start, and as the ONNX Runtime deployment quantizes), and activation ranges the min/max
  observed on ``calibration_inputs`` (default: the example) in the fused float graph. The ranges
  are recorded once per :class:`TorchInt8Builder` and reused by every plan it builds.

On x86 the engine ``"x86"`` picks fbgemm/oneDNN kernels; activations use the full 8-bit range,
which is exact on CPUs with VNNI (AVX-512 VNNI / AVX-VNNI) and may saturate 16-bit intermediate
sums on older AVX2-only CPUs. ``"qnnpack"`` is the engine of ARM boards. The engine is set only
while building (weights are packed for it) and while running, then restored.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ohq_lightning._util.timing import set_threads
from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import Option, QuantPlan
from ohq_lightning.quant.export import LearnedQuantization, learned_quantization
from ohq_lightning.quant.fake_quant import int_range, mse_scale
from ohq_lightning.quant.swap import float_copy

__all__ = ["ENGINES", "TorchDeployedModel", "TorchInt8Builder", "convert_torch", "quantized_engine", "uniform_torch"]

ENGINES: tuple[str, ...] = ("x86", "fbgemm", "onednn", "qnnpack")
_DROPPED = (nn.Identity, nn.Dropout)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation and FX warnings (this module only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
        yield


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Run a block with torch's quantized engine set to ``engine``, restoring the previous one after."""
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"quantized engine {engine!r} is not available in this torch build; "
            f"available: {torch.backends.quantized.supported_engines}"
        )
    previous = torch.backends.quantized.engine
    if previous == engine:
        yield
        return
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


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


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def _plain_modules(model: nn.Module) -> None:
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
            _replace_module(model, name, plain)
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
            _replace_module(model, name, nn.Sequential(norm, module.drop, module.act))


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    """The model as an FX graph (torch's quantization tracer), normalised for FX's int8 backend.

    Identity/Dropout nodes are dropped; ``nn.Flatten``, ``x.flatten()`` and ``torch.relu`` become
    ``torch.flatten`` and ``F.relu``, which FX's int8 backend runs on uint8 (the others would cost a
    dequantize/quantize pair). A model that cannot be traced is a ``ValueError`` naming the module.
    """
    from torch.ao.quantization.fx.tracer import QuantizationTracer

    class Tracer(QuantizationTracer):
        failed_in: str | None = None

        def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:
                if self.failed_in is None:  # the innermost module sees the error first
                    self.failed_in = self.path_of_module(m)
                raise

    tracer = Tracer([], [])
    try:
        graph = tracer.trace(model)
    except Exception as error:  # any tracing failure becomes one clear error
        where = tracer.failed_in or "<top level>"
        raise ValueError(
            f"the torch runtime cannot deploy {type(model).__name__}: torch.fx could not trace it, in module "
            f"{where!r} ({type(error).__name__}: {error}). Deploy it with the onnxruntime runtime, or make that "
            "forward traceable (no data-dependent Python control flow)"
        ) from error
    module = torch.fx.GraphModule(model, graph)
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
    return module


def _channels_last(module: torch.fx.GraphModule) -> None:
    """Put a 4-D model in channels-last layout, in place: its conv weights, and its input on entry.

    torch's int8 kernels produce channels-last (NHWC) tensors, so a float layer after a dequantize
    sees NHWC: with NCHW weights that ran slower, and an add of an NHWC and an NCHW tensor slower
    still, which made a plan's cost depend on where the first int8 layer sits. Channels-last
    throughout avoids that, and was the faster FP32 graph too (ResNet-18 0.78x, MobileNetV3-large
    0.83x the NCHW time, 1 thread).
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


def _first_conv(module: nn.Module) -> nn.Module:
    """The conv/linear inside a fused module (``ConvReLU2d`` -> its ``Conv2d``), or the module itself."""
    from torch.ao.nn.intrinsic import _FusedModule

    return module[0] if isinstance(module, _FusedModule) else module


class _Recorder(torch.fx.Interpreter):
    """Runs a float graph and records the min/max of every tensor it computes, by node name."""

    def __init__(
        self, module: torch.fx.GraphModule, ranges: dict[str, tuple[float, float]], sizes: dict[str, int]
    ) -> None:
        super().__init__(module)
        self.ranges = ranges
        self.sizes = sizes

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor) and result.is_floating_point() and result.numel():
            self.sizes[n.name] = result.numel() // max(result.shape[0], 1) if result.dim() else 1
            low, high = float(result.min()), float(result.max())
            if n.name in self.ranges:
                old = self.ranges[n.name]
                low, high = min(low, old[0]), max(high, old[1])
            self.ranges[n.name] = (low, high)
        return result


@functools.cache
def _observer_classes() -> tuple[type, type]:
    """Two light observers (torch's own build many buffers per instance, and FX makes hundreds per plan).

    ``RangeObserver``: per-tensor uint8 activations from a range set directly (``min_val``/``max_val``),
    computed like torch's ``MinMaxObserver`` (the grid covers ``[min(low, 0), max(high, 0)]``).
    ``StepObserver``: per-channel symmetric int8 weights with given step sizes and zero point 0.
    """
    from torch.ao.quantization.observer import ObserverBase

    class RangeObserver(ObserverBase):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(dtype=torch.quint8)
            self.qscheme = torch.per_tensor_affine
            self.quant_min, self.quant_max = 0, 255
            self.min_val, self.max_val = float("inf"), float("-inf")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.numel():
                self.min_val = min(self.min_val, float(x.min()))
                self.max_val = max(self.max_val, float(x.max()))
            return x

        def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            low, high = min(self.min_val, 0.0), max(self.max_val, 0.0)
            scale = max((high - low) / 255.0, float(torch.finfo(torch.float32).eps))
            zero_point = int(min(max(round(-low / scale), 0), 255))
            return torch.tensor([scale], dtype=torch.float32), torch.tensor([zero_point], dtype=torch.int32)

    class StepObserver(ObserverBase):
        def __init__(self, step: torch.Tensor | None = None, **kwargs: Any) -> None:
            super().__init__(dtype=torch.qint8)
            self.qscheme = torch.per_channel_symmetric
            self.ch_axis = 0
            self.quant_min, self.quant_max = -128, 127
            self.step = torch.ones(1) if step is None else step

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            return self.step.clone(), torch.zeros(self.step.numel(), dtype=torch.int64)

    return RangeObserver, StepObserver


def _learned_range(learned: LearnedQuantization) -> tuple[float, float] | None:
    """The float range whose uint8 grid is exactly the learned input grid (zero point 0, or 128 if signed)."""
    if learned.input_scale is None or learned.act_bits != 8:
        return None
    step = learned.input_scale
    return (-128.0 * step, 127.0 * step) if learned.input_signed else (0.0, 255.0 * step)


@dataclass
class TorchDeployedModel:
    """A model on torch's int8 CPU kernels: the converted FX graph module and the plan it follows.

    Attributes:
        assignment: layer name -> option, as deployed.
        module: the converted ``torch.fx.GraphModule`` (quantized modules where the plan is integer).
        threads: torch intra-op threads set for it (process-wide, set once).
        runtime: ``"torch"``.
        engine: torch's quantized engine the weights were packed for (``"x86"``, ``"qnnpack"``...).
    """

    assignment: dict[str, str]
    module: torch.fx.GraphModule
    threads: int
    runtime: str = "torch"
    engine: str = "x86"

    def __call__(self, inputs: torch.Tensor | np.ndarray) -> np.ndarray:
        """Run the deployed model on one input batch; returns the output array."""
        tensor = inputs if isinstance(inputs, torch.Tensor) else torch.from_numpy(np.asarray(inputs, np.float32))
        with torch.no_grad(), quantized_engine(self.engine):
            return self.module(tensor.detach().float().cpu()).numpy()

    def runner(self, example_inputs: torch.Tensor) -> Callable[[], Any]:
        """A zero-argument callable that runs one inference on ``example_inputs`` (for timing)."""
        module, engine = self.module, self.engine
        tensor = example_inputs.detach().float().cpu()

        def run() -> Any:
            with torch.no_grad(), quantized_engine(engine):
                return module(tensor)

        return run


@dataclass
class _LayerWeight:
    float_weight: torch.Tensor  # BatchNorm folded
    original: torch.Tensor  # the weight before BatchNorm folding, flattened per output channel
    learned: LearnedQuantization | None
    snapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


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
        _plain_modules(float_model)
        float_model.eval()
        from torch.ao.quantization.backend_config import get_native_backend_config
        from torch.ao.quantization.quantize_fx import _fuse_fx

        self._backend = get_native_backend_config()
        with _quiet(), torch.no_grad():
            traced = _trace(float_model)
            self.fused = _fuse_fx(traced, False, None, self._backend)
        if self.example_inputs.dim() == 4:
            _channels_last(self.fused)
        self._layer_nodes: dict[str, list[str]] = {}
        for node in self.fused.graph.nodes:
            if node.op == "call_module" and node.target in self.layer_names:
                self._layer_nodes.setdefault(str(node.target), []).append(node.name)
        self._weights: dict[str, _LayerWeight] = {}
        for name in self._layer_nodes:
            conv = _first_conv(self.fused.get_submodule(name))
            self._weights[name] = _LayerWeight(conv.weight.detach().clone(), originals[name], learned.get(name))
        self._calibration = [batch.detach().float().cpu() for batch in calibration_inputs or [self.example_inputs]]
        self._ranges: dict[str, tuple[float, float]] = {}
        self._sizes: dict[str, int] = {}  # elements per sample of each tensor
        self._learned_inputs: dict[str, tuple[float, float]] = {}
        for name, found in learned.items():
            window = _learned_range(found)
            if window is not None and name in self._layer_nodes:
                self._learned_inputs[name] = window

    def _statistics(self) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
        """Each tensor's float range over the calibration batches and its size, recorded on first use."""
        if not self._sizes:
            recorder = _Recorder(self.fused, self._ranges, self._sizes)
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

    def _snapped(self, name: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded weight of ``name`` on its ``bits``-bit grid, and its per-channel step sizes."""
        entry = self._weights[name]
        if bits not in entry.snapped:
            weight = entry.float_weight
            flat = weight.reshape(weight.shape[0], -1)
            qmin, qmax = int_range(bits, signed=True)
            learned = entry.learned
            if learned is not None and learned.weight_scale is not None and learned.weight_bits == bits:
                # Fake quant rounds the conv weight w before BatchNorm; folding multiplies each
                # channel by k: the same grid, with step |k| * s, mirrored where k < 0.
                original = entry.original
                norm = (original * original).sum(dim=1)
                factor = torch.where(norm > 0, (flat * original).sum(dim=1) / norm.clamp_min(1e-30), 0.0)
                step = learned.weight_scale.to(weight.dtype)
                integers = torch.clamp(torch.round(original / step[:, None]), qmin, qmax) * torch.sign(factor)[:, None]
                scale = step * factor.abs()
            else:
                scale = mse_scale(weight, bits, signed=True, dim=0).reshape(-1)
                integers = torch.clamp(torch.round(flat / scale[:, None]), qmin, qmax)
            alive = scale > 0
            scale = torch.where(alive, scale, torch.ones_like(scale))
            integers = torch.where(alive[:, None], integers, torch.zeros_like(integers)).clamp(-128, 127)
            entry.snapped[bits] = ((integers * scale[:, None]).reshape(weight.shape), scale.float())
        return entry.snapped[bits]

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
        assignment = dict(plan.assignment if isinstance(plan, QuantPlan) else plan)
        unknown = sorted(set(assignment) - set(self.layer_names))
        if unknown:
            raise ValueError(f"the plan names layers the model does not have: {unknown}")
        integer = {name: Option.parse(option) for name, option in assignment.items() if _check_option(name, option)}
        hidden = sorted(set(integer) - set(self._layer_nodes))
        if hidden:
            raise ValueError(
                f"layers {hidden} are not module calls of the traced graph (their forward was traced through, "
                "e.g. timm's Conv2dSame/StdConv2d): the torch runtime cannot put them on int8 kernels; keep them fp32"
            )
        from torch.ao.quantization import QConfig, QConfigMapping
        from torch.ao.quantization.fx.prepare import prepare
        from torch.ao.quantization.qconfig_mapping import _FIXED_QPARAMS_OP_TO_OBSERVER
        from torch.ao.quantization.quantize_fx import convert_fx

        activation, step_observer = _observer_classes()
        # A new graph module over the template's leaf modules (FX copies the containers, not the
        # leaves): conversion replaces leaves in the new containers only. Integer layers get their
        # own copy, with weights on their grid.
        module = torch.fx.GraphModule(self.fused, copy.deepcopy(self.fused.graph))
        for name, option in integer.items():
            assert option.weight_bits is not None
            snapped, _ = self._snapped(name, option.weight_bits)
            layer = copy.deepcopy(self.fused.get_submodule(name))
            _first_conv(layer).weight = nn.Parameter(snapped.clone(), requires_grad=False)
            _replace_module(module, name, layer)
        int8 = self.int8_nodes(set(integer))
        mapping = QConfigMapping()
        scopes: dict[str, tuple[str, type]] = {}
        default_qconfig = QConfig(activation=activation, weight=step_observer)
        for node in module.graph.nodes:
            scope = f"_ohq_{node.name}"  # one scope per node: its qconfig is looked up by that name
            scopes[node.name] = (scope, type(None))
            qconfig = None
            if node.name in int8:
                if node.op == "call_module" and node.target in integer:
                    _, step = self._snapped(str(node.target), integer[str(node.target)].weight_bits)  # type: ignore[arg-type]
                    qconfig = QConfig(activation=activation, weight=step_observer.with_args(step=step))
                else:
                    kind = type(module.get_submodule(node.target)) if node.op == "call_module" else node.target
                    fixed = _FIXED_QPARAMS_OP_TO_OBSERVER.get(kind) if _hashable(kind) else None
                    qconfig = default_qconfig if fixed is None else QConfig(activation=fixed, weight=step_observer)
            if node.op == "call_module":
                mapping.set_module_name(str(node.target), qconfig)
            else:
                mapping.set_module_name(scope, qconfig)
        from torch.ao.quantization.fx.utils import assert_and_get_unique_device

        try:
            with _quiet(), quantized_engine(self.engine), torch.no_grad():
                prepared = prepare(
                    module, mapping, False, scopes, example_inputs=(self.example_inputs,), backend_config=self._backend
                )
                self._set_ranges(prepared, activation, set(integer))
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


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def convert_torch(
    model: nn.Module,
    plan: QuantPlan | Mapping[str, str],
    example_inputs: torch.Tensor,
    *,
    calibration_inputs: Sequence[torch.Tensor] | None = None,
    threads: int = 1,
    engine: str = "x86",
) -> TorchDeployedModel:
    """Deploy ``model`` following ``plan`` to torch's int8 CPU kernels (see the module docstring).

    Args:
        model: the model (plain, or with a plan applied: deployed from its float weights with the
            step sizes it learned; the model is not changed).
        plan: a :class:`~ohq_lightning.plan.QuantPlan` or a mapping layer -> option; layers not
            named stay float.
        example_inputs: one input tensor.
        calibration_inputs: batches whose ranges set activation quantization where no learned step
            exists (default: the example).
        threads: torch intra-op threads (process-wide: set once per process, see
            :func:`~ohq_lightning._util.timing.set_threads`).
        engine: torch's quantized engine: ``"x86"`` (default), ``"fbgemm"``, ``"onednn"`` or ``"qnnpack"`` (ARM).

    Raises:
        ValueError: a model torch.fx cannot trace, layers the model lacks, or options torch's kernels
            cannot run.
    """
    set_threads(threads)
    builder = TorchInt8Builder(model, example_inputs, calibration_inputs=calibration_inputs, engine=engine)
    assignment = dict(plan.assignment if isinstance(plan, QuantPlan) else plan)
    return TorchDeployedModel(assignment, builder.build(assignment), threads, engine=engine)


def uniform_torch(model: nn.Module, option: str, example_inputs: torch.Tensor, **kwargs: Any) -> TorchDeployedModel:
    """Deploy ``model`` with every quantizable layer at ``option`` (e.g. ``"w8a8"``), like :func:`convert_torch`."""
    from ohq_lightning.deploy.runtimes import uniform_assignment

    return convert_torch(model, uniform_assignment(model, option, example_inputs), example_inputs, **kwargs)
