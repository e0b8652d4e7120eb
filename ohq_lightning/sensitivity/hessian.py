"""The HAWQ-style baseline: Hessian trace x weight quantization error, from real data and a loss.

Unlike MQE and the data-free baselines of :mod:`ohq_lightning.sensitivity.baselines`, it needs
labelled batches, so ``search`` does not compute it by name: pass its table, or a provider such as
``lambda model, layers, options: hessian_sensitivity(model, loader, layers, options)``.
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
from ohq_lightning.layers import is_weight_pruned, weight_parameter
from ohq_lightning.plan import LayerInfo, SensitivityTable, parse_options
from ohq_lightning.sensitivity._common import layer_names, weighted_float_layers
from ohq_lightning.sensitivity.baselines import weight_error_sensitivity

__all__ = ["TRACE_MODES", "hessian_sensitivity"]

_TRACE_WEIGHTS: dict[str, Callable[[float], float]] = {
    "abs": abs,
    "clamp": lambda raw: max(raw, 0.0),
    "raw": lambda raw: raw,
}

#: How :func:`hessian_sensitivity` turns a layer's estimated Hessian trace into a weight:
#: ``"abs"`` its absolute value (the default), ``"clamp"`` ``max(trace, 0)`` (a layer with a
#: negative trace scores 0), ``"raw"`` the signed trace (for analysis: negative scores make the
#: ILP prefer low bits on those layers).
TRACE_MODES: tuple[str, ...] = tuple(_TRACE_WEIGHTS)

_Batch = tuple[Any, Any]


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


@contextlib.contextmanager
def _eval_with_weight_grads(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Eval mode, with gradients on ``params``; every module's mode and every ``requires_grad`` restored on exit."""
    modes = {module: module.training for module in model.modules()}
    requires = {id(p): p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        for p in model.parameters():
            p.requires_grad_(requires.get(id(p), p.requires_grad))


def _weights_counted(module: nn.Module) -> int:
    """The number of weights the layer computes with (unpruned ones only)."""
    if is_weight_pruned(module):
        return max(1, int(module.weight_mask.count_nonzero()))
    return module.weight.numel()


def _split_batch(batch: Any) -> _Batch:
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


def _weight_params(modules: dict[str, nn.Module], names: Sequence[str]) -> list[torch.Tensor]:
    params = [weight_parameter(modules[name]) for name in names]
    if any(p is None for p in params):
        raise ValueError(
            f"layers {[n for n, p in zip(names, params, strict=True) if p is None]} have no weight parameter"
        )
    return params  # type: ignore[return-value]


def _hutchinson(
    loss: torch.Tensor, params: Sequence[torch.Tensor], samples: torch.Tensor, share: float, seed: int, bar: Any
) -> None:
    """Add ``share * v_l^T (H v)_l`` to ``samples[l, i]`` for every layer ``l`` and iteration ``i`` (in place)."""
    iterations = samples.shape[1]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    for i in range(iterations):
        bar.update(1)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)  # same v_i for every batch
        vectors = [_rademacher(p.shape, generator, p) for p in params]
        products = torch.autograd.grad(grads, params, grad_outputs=vectors, retain_graph=i < iterations - 1)
        for index, (v, hv) in enumerate(zip(vectors, products, strict=True)):
            samples[index, i] += share * float((v.double() * hv.double()).sum())


def _trace_samples(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    data: Sequence[_Batch],
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    *,
    total: int,
    iterations: int,
    seed: int,
    progress: bool,
) -> tuple[torch.Tensor, float, int]:
    """Hutchinson samples of each layer's trace (layer x iteration), the mean loss, and the Hardsigmoids swapped."""
    samples = torch.zeros(len(params), iterations, dtype=torch.float64)
    losses: list[float] = []
    bar = progress_bar([], desc="Hessian trace per layer (baseline)", enabled=progress, total=len(data) * iterations)
    try:
        with _eval_with_weight_grads(model, params), _twice_differentiable(model) as swapped, torch.enable_grad():
            for inputs, targets in data:
                share = _batch_size(inputs) / total
                loss = loss_fn(model(inputs), targets)
                losses.append(float(loss.detach()) * share)
                _hutchinson(loss, params, samples, share, seed, bar)
                del loss
    finally:
        bar.close()
    return samples, sum(losses), swapped


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
    are averaged (``meta["trace_stderr"]`` says how settled each is).

    A trained model's trace estimates can come out negative; a negative weight would make the ILP
    prefer the lowest bits on exactly those layers, so by default (``trace="abs"``) the magnitude
    is used (see :data:`TRACE_MODES`, and docs/notes/sensitivity.md for why). ``meta["negative_trace_layers"]``
    lists the layers whose estimate was negative. ``nn.Hardsigmoid`` (no double backward in torch)
    is swapped for the equal ``(x + 3).clamp(0, 6) / 6`` for the duration.

    Args:
        model: the float model (restored exactly: modes, ``requires_grad`` and modules).
        batches: ``(inputs, targets)`` pairs (e.g. a ``DataLoader``), read once; the model is called
            with ``inputs``.
        layers: the layers to score (``LayerInfo`` or names).
        options: option names; the weight error is
            :func:`~ohq_lightning.sensitivity.baselines.weight_quantization_error`.
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
    if trace not in _TRACE_WEIGHTS:
        raise ValueError(f"unknown trace mode {trace!r}; use one of {TRACE_MODES}")
    if int(iterations) < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    iterations = int(iterations)
    started = time.perf_counter()
    parsed = parse_options(options)
    names = layer_names(layers)
    modules = weighted_float_layers(model, names)
    data = [_split_batch(batch) for batch in batches]
    if not data:
        raise ValueError("hessian_sensitivity needs at least one (inputs, targets) batch")
    total = sum(_batch_size(inputs) for inputs, _ in data)
    params = _weight_params(modules, names)
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    samples, loss, swapped = _trace_samples(
        model, params, data, loss_fn, total=total, iterations=iterations, seed=seed, progress=progress
    )
    traces = samples.mean(dim=1)
    stderr = samples.std(dim=1) / math.sqrt(iterations) if iterations > 1 else torch.full_like(traces, float("nan"))
    weights = {
        name: _TRACE_WEIGHTS[trace](float(traces[i]) / _weights_counted(modules[name])) for i, name in enumerate(names)
    }
    errors = weight_error_sensitivity(model, names, [option.name for option in parsed]).scores
    scores = {name: {option.name: weights[name] * errors[name][option.name] for option in parsed} for name in names}
    meta: dict[str, Any] = {
        "iterations": iterations,
        "num_inputs": total,
        "trace_mode": trace,
        "loss": loss,
        "trace": {name: float(traces[i]) for i, name in enumerate(names)},
        "trace_stderr": {name: float(stderr[i]) for i, name in enumerate(names)},
        "trace_per_weight": weights,
        "negative_trace_layers": [name for i, name in enumerate(names) if float(traces[i]) < 0],
        "hardsigmoid_swapped": swapped,
        "seed": seed,
        "seconds": time.perf_counter() - started,
    }
    return SensitivityTable(method="hessian", scores=scores, meta=meta)
