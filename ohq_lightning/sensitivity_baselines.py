"""Baseline sensitivity providers to compare MQE with: weight error, Hessian trace x weight error, random.

Each returns a :class:`~ohq_lightning.plan.SensitivityTable` (layer -> option -> score, higher is
worse) like :func:`~ohq_lightning.sensitivity.mqe_sensitivity`, so any of them can drive the ILP
(:func:`~ohq_lightning.solver.solve`, or ``search(..., sensitivity=...)``):

* :func:`weight_error_sensitivity` (``method="weight_error"``, data-free): ``||Q(W) - W||^2``, the
  summed squared weight quantization error of the layer, with the very quantizer the fake-quant
  layers use (:class:`~ohq_lightning.quant.fake_quant.WeightFakeQuant`: symmetric, per output
  channel, MSE-optimal clipping). It sees weights only: ``w8a8`` and ``w8a4`` score the same.
* :func:`hessian_sensitivity` (``method="hessian"``, needs real data and a loss): HAWQ-style
  ``|Tr(H)| / n * ||Q(W) - W||^2``, with ``Tr(H)`` the trace of the loss Hessian over the layer's
  ``n`` weights, estimated by Hutchinson's method (``E[v^T H v]``, ``v`` Rademacher).
* :func:`random_sensitivity` (``method="random"``, seeded): a random layer order; by default each
  layer's scores still grow as bits shrink, so only the order of layers is random.

Float options: ``fp32`` scores 0 everywhere; ``bf16``/``fp16`` score the error of rounding the
weight to that format (weight error, Hessian) or sit between 8 and 16 bits (random).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ohq_lightning._util.progress import progress_bar
from ohq_lightning.layers import float_weight, is_weight_pruned, weight_parameter
from ohq_lightning.plan import MAX_BITS, LayerInfo, Option, SensitivityTable, parse_options
from ohq_lightning.quant.fake_quant import FloatCast, WeightFakeQuant
from ohq_lightning.quant.swap import quantized_layers

__all__ = [
    "TRACE_MODES",
    "hessian_sensitivity",
    "random_sensitivity",
    "weight_error_sensitivity",
    "weight_quantization_error",
]

#: How :func:`hessian_sensitivity` turns a layer's estimated Hessian trace into a weight:
#: ``"abs"`` its absolute value (the default), ``"clamp"`` ``max(trace, 0)`` (a layer with a
#: negative trace scores 0), ``"raw"`` the signed trace (for analysis: negative scores make the
#: ILP prefer low bits on those layers).
TRACE_MODES = ("abs", "clamp", "raw")

#: Significand bits that :func:`random_sensitivity` ranks the float formats by (fp32 scores 0).
_FLOAT_RANK_BITS = {"bf16": 8, "fp16": 11}


def _layer_names(layers: Sequence[LayerInfo] | Sequence[str]) -> list[str]:
    return [layer.name if isinstance(layer, LayerInfo) else str(layer) for layer in layers]


def _layer_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    quantized = sorted(quantized_layers(model))
    if quantized:
        raise ValueError(
            f"the model has fake-quant layers {quantized}: strip_plan(model) first: baselines score the float model"
        )
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"the model has no layers named {missing}")
    not_weighted = [name for name in names if not isinstance(getattr(modules[name], "weight", None), torch.Tensor)]
    if not_weighted:
        raise ValueError(f"layers {not_weighted} have no weight tensor to quantize")
    return {name: modules[name] for name in names}


@torch.no_grad()
def weight_quantization_error(weight: torch.Tensor, option: str | Option) -> float:
    """``||Q(W) - W||^2``: the summed squared error of quantizing ``weight`` at ``option``.

    ``Q`` is the fake-quant layers' own weight quantizer at the option's weight bits (fresh, so its
    step sizes are the MSE-optimal ones); a ``bf16``/``fp16`` option rounds to that format, ``fp32``
    is exact (0). Activation bits play no part.

    Example:
        >>> w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
        >>> weight_quantization_error(w, "w2a8") > weight_quantization_error(w, "w8a8") > 0
        True
    """
    parsed = option if isinstance(option, Option) else Option.parse(option)
    weight = weight.detach().float()
    if parsed.float_format == "fp32":
        return 0.0
    if parsed.is_float:
        assert parsed.float_format is not None
        quantized = FloatCast(parsed.float_format)(weight)
    else:
        assert parsed.weight_bits is not None
        quantized = WeightFakeQuant(weight, parsed.weight_bits)(weight)
    return float((quantized.double() - weight.double()).pow(2).sum())


def _weight_errors(
    modules: dict[str, nn.Module], options: Sequence[Option], progress: bool, desc: str
) -> dict[str, dict[str, float]]:
    """Layer -> option -> ``||Q(W) - W||^2``; options that quantize the weight alike are computed once."""
    errors: dict[str, dict[str, float]] = {}
    for name in progress_bar(list(modules), desc=desc, enabled=progress):
        weight = float_weight(modules[name])
        by_weight_format: dict[tuple[int | None, str | None], float] = {}
        row = errors.setdefault(name, {})
        for option in options:
            key = (option.weight_bits, option.float_format)
            if key not in by_weight_format:
                by_weight_format[key] = weight_quantization_error(weight, option)
            row[option.name] = by_weight_format[key]
    return errors


def weight_error_sensitivity(
    model: nn.Module,
    layers: Sequence[LayerInfo] | Sequence[str],
    options: Sequence[str],
    *,
    progress: bool = False,
) -> SensitivityTable:
    """Score every layer at every option by its weight quantization error ``||Q(W) - W||^2`` (data-free).

    Args:
        model: the float model (not modified); a pruned layer is scored on its masked weight.
        layers: the layers to score (``LayerInfo`` or names).
        options: option names (see :func:`weight_quantization_error` for how each is scored).
        progress: show a progress bar over layers.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> table = weight_error_sensitivity(model, ["0", "2"], ["w2a8", "w4a8", "w8a8"])
        >>> row = table.scores["0"]
        >>> table.method, row["w2a8"] > row["w4a8"] > row["w8a8"] > 0
        ('weight_error', True)
    """
    started = time.perf_counter()
    parsed = parse_options(options)
    modules = _layer_modules(model, _layer_names(layers))
    scores = _weight_errors(modules, parsed, progress, "weight error")
    meta = {"score": "sum of squared weight quantization error", "seconds": time.perf_counter() - started}
    return SensitivityTable(method="weight_error", scores=scores, meta=meta)


def random_sensitivity(
    layers: Sequence[LayerInfo] | Sequence[str],
    options: Sequence[str],
    *,
    seed: int = 0,
    monotone: bool = True,
) -> SensitivityTable:
    """Random scores, the null baseline (seeded: the same seed gives the same table).

    With ``monotone`` (the default) each layer draws one number ``u`` uniform in (0, 1) and an
    option scores ``u * (4**(8 - w) + 4**(8 - a))`` for ``w`` weight and ``a`` activation bits
    (the ``a`` term only when activations are quantized; ``4**(-bits)`` follows the variance of
    uniform quantization noise): fewer bits always score worse, and only the order of layers is
    random. Without it every (layer, option) draws its own uniform number. ``fp32`` scores 0;
    ``bf16`` and ``fp16`` rank as 8 and 11 weight bits.

    Example:
        >>> table = random_sensitivity(["a", "b"], ["w2a8", "w8a8"], seed=1)
        >>> table.scores == random_sensitivity(["a", "b"], ["w2a8", "w8a8"], seed=1).scores
        True
        >>> all(row["w2a8"] > row["w8a8"] > 0 for row in table.scores.values())
        True
    """
    parsed = parse_options(options)
    names = _layer_names(layers)
    generator = torch.Generator().manual_seed(seed)
    scores: dict[str, dict[str, float]] = {}
    for name in names:
        draws = torch.rand(len(parsed) + 1, generator=generator, dtype=torch.float64).tolist()
        row = scores.setdefault(name, {})
        for index, option in enumerate(parsed):
            if option.float_format == "fp32":
                row[option.name] = 0.0
            elif not monotone:
                row[option.name] = draws[index]
            elif option.is_float:
                assert option.float_format is not None
                row[option.name] = draws[-1] * 4.0 ** (MAX_BITS - _FLOAT_RANK_BITS[option.float_format])
            else:
                assert option.weight_bits is not None
                act = 4.0 ** (MAX_BITS - option.act_bits) if option.act_bits is not None else 0.0
                row[option.name] = draws[-1] * (4.0 ** (MAX_BITS - option.weight_bits) + act)
    return SensitivityTable(method="random", scores=scores, meta={"seed": seed, "monotone": monotone})


class _Hardsigmoid(nn.Module):
    """``nn.Hardsigmoid`` written as ``(x + 3).clamp(0, 6) / 6``: the same values, twice differentiable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 3).clamp(0, 6) / 6


@contextlib.contextmanager
def _twice_differentiable(model: nn.Module) -> Iterator[int]:
    """Swap every ``nn.Hardsigmoid`` (no double backward in torch) for an equal twin; restore on exit.

    Yields how many modules were swapped.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if type(child) is nn.Hardsigmoid:
                swapped.append((parent, attr, child))
    twins: dict[int, nn.Module] = {}
    try:
        for parent, attr, child in swapped:
            setattr(parent, attr, twins.setdefault(id(child), _Hardsigmoid()))
        yield len(twins)
    finally:
        for parent, attr, child in swapped:
            setattr(parent, attr, child)


def _weights_counted(module: nn.Module) -> int:
    """The number of weights the layer computes with (unpruned ones only)."""
    if is_weight_pruned(module):
        return max(1, int(module.weight_mask.count_nonzero()))
    return module.weight.numel()


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}")


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor) and inputs.dim() > 0:
        return int(inputs.shape[0])
    raise ValueError("hessian_sensitivity needs each batch's inputs as one tensor with a batch dimension")


def _rademacher(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    signs = torch.randint(0, 2, shape, generator=generator).to(dtype=like.dtype) * 2 - 1
    return signs.to(device=like.device)


def hessian_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Sequence[LayerInfo] | Sequence[str],
    options: Sequence[str],
    *,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    iterations: int = 50,
    trace: str = "abs",
    seed: int = 0,
    progress: bool = True,
) -> SensitivityTable:
    """HAWQ-style scores: ``|Tr(H)| / n * ||Q(W) - W||^2`` per layer and option, from real data and a loss.

    ``H`` is the Hessian of the loss over all ``batches`` (each batch's mean loss weighted by its
    size) with respect to the layer's ``n`` weights, in eval mode (BatchNorm uses its running
    statistics: the function that gets quantized). Hutchinson's estimator gives every layer's
    trace from the same Hessian-vector products: each iteration draws one Rademacher vector ``v``
    over all the layers' weights and reads ``v_l^T (H v)_l`` per layer; ``iterations`` of them
    are averaged (HAWQ runs up to 200; ``meta["trace_stderr"]`` says how settled each is).

    Negative traces: a Hessian trace is the sum of the curvatures along the layer's weights, and
    near a minimum it should be positive, but a model trained to near-zero loss sits where the
    Hessian is dominated by small, indefinite terms, and the estimates of many layers come out
    negative. A negative weight would make the ILP prefer the lowest bits on exactly those
    layers, so by default (``trace="abs"``) the magnitude of the curvature is used; ``"clamp"``
    scores such layers 0 and ``"raw"`` keeps the sign (see :data:`TRACE_MODES`).
    ``meta["negative_trace_layers"]`` lists the layers whose estimate was negative.

    ``nn.Hardsigmoid`` (MobileNetV3's squeeze-excite gate) has no double backward in torch: it is
    swapped for the equal ``(x + 3).clamp(0, 6) / 6`` for the duration (a functional
    ``F.hardsigmoid`` inside a ``forward`` cannot be swapped and raises).

    Args:
        model: the float model (restored exactly: modes, ``requires_grad`` and modules).
        batches: ``(inputs, targets)`` pairs (e.g. a ``DataLoader``), read once; the model is called
            with ``inputs``.
        layers: the layers to score (``LayerInfo`` or names).
        options: option names; the weight error is :func:`weight_quantization_error`.
        loss_fn: ``loss_fn(outputs, targets)`` -> the batch's mean loss (default: cross-entropy).
        iterations: Hutchinson samples.
        trace: one of :data:`TRACE_MODES`.
        seed: seed of the Rademacher vectors.
        progress: show a progress bar.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> table = hessian_sensitivity(model, data, ["0", "2"], ["w2a8", "w8a8"], iterations=8, progress=False)
        >>> table.method, table.scores["2"]["w2a8"] > table.scores["2"]["w8a8"]
        ('hessian', True)
    """
    if trace not in TRACE_MODES:
        raise ValueError(f"unknown trace mode {trace!r}; use one of {TRACE_MODES}")
    if int(iterations) < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    iterations = int(iterations)
    started = time.perf_counter()
    parsed = parse_options(options)
    names = _layer_names(layers)
    modules = _layer_modules(model, names)
    data = [_split_batch(batch) for batch in batches]
    if not data:
        raise ValueError("hessian_sensitivity needs at least one (inputs, targets) batch")
    total = sum(_batch_size(inputs) for inputs, _ in data)
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    params = [weight_parameter(modules[name]) for name in names]
    if any(p is None for p in params):
        raise ValueError(
            f"layers {[n for n, p in zip(names, params, strict=True) if p is None]} have no weight parameter"
        )
    samples = torch.zeros(len(names), iterations, dtype=torch.float64)
    losses: list[float] = []

    modes = {module: module.training for module in model.modules()}
    requires = {id(p): p.requires_grad for p in model.parameters()}
    swapped = 0
    bar = progress_bar([], desc="Hessian trace", enabled=progress, total=len(data) * iterations)
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        with _twice_differentiable(model) as swapped, torch.enable_grad():
            for inputs, targets in data:
                share = _batch_size(inputs) / total
                loss = loss_fn(model(inputs), targets)
                losses.append(float(loss.detach()) * share)
                grads = torch.autograd.grad(loss, params, create_graph=True)
                for i in range(iterations):
                    bar.update(1)
                    generator = torch.Generator().manual_seed(seed * 1_000_003 + i)  # same v_i for every batch
                    vectors = [_rademacher(p.shape, generator, p) for p in params]
                    products = torch.autograd.grad(grads, params, grad_outputs=vectors, retain_graph=i < iterations - 1)
                    for index, (v, hv) in enumerate(zip(vectors, products, strict=True)):
                        samples[index, i] += share * float((v.double() * hv.double()).sum())
                del grads, loss
    finally:
        bar.close()
        for module, training in modes.items():
            module.training = training
        for p in model.parameters():
            p.requires_grad_(requires.get(id(p), p.requires_grad))

    traces = samples.mean(dim=1)
    stderr = samples.std(dim=1) / math.sqrt(iterations) if iterations > 1 else torch.full_like(traces, float("nan"))
    counts = [_weights_counted(modules[name]) for name in names]
    errors = _weight_errors(modules, parsed, False, "weight error")
    scores: dict[str, dict[str, float]] = {}
    weights: dict[str, float] = {}
    for index, name in enumerate(names):
        raw = float(traces[index]) / counts[index]
        weight = abs(raw) if trace == "abs" else max(raw, 0.0) if trace == "clamp" else raw
        weights[name] = weight
        scores[name] = {option.name: weight * errors[name][option.name] for option in parsed}
    meta: dict[str, Any] = {
        "iterations": iterations,
        "num_inputs": total,
        "trace_mode": trace,
        "loss": sum(losses),
        "trace": {name: float(traces[i]) for i, name in enumerate(names)},
        "trace_stderr": {name: float(stderr[i]) for i, name in enumerate(names)},
        "trace_per_weight": weights,
        "negative_trace_layers": [name for i, name in enumerate(names) if float(traces[i]) < 0],
        "hardsigmoid_swapped": swapped,
        "seed": seed,
        "seconds": time.perf_counter() - started,
    }
    return SensitivityTable(method="hessian", scores=scores, meta=meta)
