"""Data-free baselines to compare MQE with: weight quantization error, and random scores.

Each returns a :class:`~ohq_lightning.plan.SensitivityTable` (layer -> option -> score, higher is
worse) like :func:`~ohq_lightning.sensitivity.mqe_sensitivity`, so any of them can drive the ILP
(:func:`~ohq_lightning.solver.solve`, or ``search(..., sensitivity=...)``):

* :func:`weight_error_sensitivity` (``method="weight_error"``): ``||Q(W) - W||^2``, the summed
  squared weight quantization error of the layer, with the very quantizer the fake-quant layers
  use (:class:`~ohq_lightning.quant.fake_quant.WeightFakeQuant`: symmetric, per output channel,
  MSE-optimal clipping). It sees weights only: ``w8a8`` and ``w8a4`` score the same.
* :func:`random_sensitivity` (``method="random"``, seeded): a random layer order; by default each
  layer's scores still grow as bits shrink, so only the order of layers is random.

The Hessian baseline, which needs real data and a loss, is :mod:`ohq_lightning.sensitivity.hessian`.
Float options: ``fp32`` scores 0 everywhere; ``bf16``/``fp16`` score the error of rounding the
weight to that format (weight error) or sit between 8 and 16 bits (random).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from ohq_lightning._util.progress import progress_bar
from ohq_lightning.layers import float_weight
from ohq_lightning.plan import MAX_BITS, LayerInfo, Option, SensitivityTable, parse_options
from ohq_lightning.quant.fake_quant import FloatCast, WeightFakeQuant
from ohq_lightning.sensitivity._common import layer_names, weighted_float_layers

__all__ = ["random_sensitivity", "weight_error_sensitivity", "weight_quantization_error"]

#: Significand bits that :func:`random_sensitivity` ranks the float formats by (fp32 scores 0).
_FLOAT_RANK_BITS = {"bf16": 8, "fp16": 11}


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
    modules: dict[str, nn.Module], options: Sequence[Option], progress: bool
) -> dict[str, dict[str, float]]:
    """Layer -> option -> ``||Q(W) - W||^2``; options that quantize the weight alike are computed once."""
    errors: dict[str, dict[str, float]] = {}
    for name in progress_bar(list(modules), desc="weight quantization error per layer (baseline)", enabled=progress):
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
    modules = weighted_float_layers(model, layer_names(layers))
    scores = _weight_errors(modules, parsed, progress)
    meta = {"score": "sum of squared weight quantization error", "seconds": time.perf_counter() - started}
    return SensitivityTable(method="weight_error", scores=scores, meta=meta)


def _random_score(option: Option, draw: float, own_draw: float, monotone: bool) -> float:
    """One option's random score from the layer's shared ``draw`` (or, not ``monotone``, the option's own)."""
    if option.float_format == "fp32":
        return 0.0
    if not monotone:
        return own_draw
    if option.is_float:
        assert option.float_format is not None
        return draw * 4.0 ** (MAX_BITS - _FLOAT_RANK_BITS[option.float_format])
    assert option.weight_bits is not None
    act = 4.0 ** (MAX_BITS - option.act_bits) if option.act_bits is not None else 0.0
    return draw * (4.0 ** (MAX_BITS - option.weight_bits) + act)


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
    generator = torch.Generator().manual_seed(seed)
    scores: dict[str, dict[str, float]] = {}
    for name in layer_names(layers):
        draws = torch.rand(len(parsed) + 1, generator=generator, dtype=torch.float64).tolist()
        row = scores.setdefault(name, {})
        for index, option in enumerate(parsed):
            row[option.name] = _random_score(option, draws[-1], draws[index], monotone)
    return SensitivityTable(method="random", scores=scores, meta={"seed": seed, "monotone": monotone})
