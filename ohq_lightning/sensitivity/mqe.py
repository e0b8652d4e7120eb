"""MQE: mask-guided quantization estimation of each layer's accuracy impact, data-free.

For every layer and option, only that layer is perturbed (the mask) while the rest of the
network stays in full precision, and the impact is ``KL(softmax(fp) || softmax(perturbed))``
averaged over synthetic inputs. Two readings of "perturb" are offered (:data:`PERTURBATIONS`):

* ``"quantize"`` (the OHQ paper): the layer's weights are fake-quantized at the option's
  bits, and its input too when the option quantizes activations;
* ``"random_mask"`` (an earlier code base of the paper's first author): a random fraction of
  the layer's weights is zeroed; the fraction grows as the option's weight bits shrink (see
  :data:`DEFAULT_MASK_FRACTIONS`; our choice, the paper gives none).

MQE supports models called with one input tensor: the synthetic inputs are one batch tensor,
and each chunk of it is passed to the model as its only argument.

Everything upstream of the perturbed layer computes what the float reference run computed, so
when the model traces with :mod:`torch.fx`, a suffix runner (:mod:`._suffix`) re-runs only the
nodes that depend on the perturbed layer, from the recorded reference values; the scores are the
same. Otherwise every score runs a full forward. ``meta["recompute"]`` says which: ``"suffix"``
or ``"full: <why>"``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ohq_lightning._util.progress import progress_bar
from ohq_lightning.layers import first_tensor, is_weight_pruned, preserved_state, run_model, weight_parameter
from ohq_lightning.plan import LayerInfo, Option, SensitivityTable, parse_options
from ohq_lightning.quant.fake_quant import ActivationFakeQuant
from ohq_lightning.quant.modules import QuantLayer
from ohq_lightning.quant.swap import apply_plan, strip_plan
from ohq_lightning.sensitivity._common import check_float_model, find_layers, layer_names
from ohq_lightning.sensitivity._suffix import suffix_runner

__all__ = ["DEFAULT_MASK_FRACTIONS", "PERTURBATIONS", "kl_divergence", "mqe_sensitivity"]

#: Fraction of weights zeroed by ``"random_mask"`` at each weight bit-width.
DEFAULT_MASK_FRACTIONS: dict[int, float] = {8: 0.01, 7: 0.02, 6: 0.04, 5: 0.08, 4: 0.15, 3: 0.3, 2: 0.5}

# Re-run only what the perturbed layer changes when the model traces (tests switch it off to compare).
_SUFFIX_RECOMPUTE = True


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(reference) || softmax(logits))`` over the last dimension, averaged over the rest."""
    ref = F.log_softmax(reference_logits.double(), dim=-1)
    other = F.log_softmax(logits.double(), dim=-1)
    kl = (ref.exp() * (ref - other)).sum(dim=-1)
    return kl.mean().clamp_min(0.0)


def _logits(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    outputs = []
    for chunk in inputs.split(batch_size):
        output = first_tensor(run_model(model, chunk))
        if output is None:
            raise ValueError("the model's output holds no tensor to compare")
        outputs.append(output.detach())
    return torch.cat(outputs)


def _mask_score(
    model: nn.Module,
    module: nn.Module,
    fraction: float,
    reference: torch.Tensor,
    inputs: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    logits: Callable[[], torch.Tensor] | None = None,
) -> float:
    # the parameter the forward reads: a pruned module's weight_orig (its forward computes
    # weight_orig * weight_mask afresh, so editing the weight attribute would change nothing)
    weight = weight_parameter(module)
    if weight is None:
        weight = module.weight
    keep = (torch.rand(weight.shape, generator=generator) >= fraction).to(device=weight.device, dtype=weight.dtype)
    original = weight.detach().clone()
    try:
        weight.data.mul_(keep)
        perturbed = logits() if logits is not None else _logits(model, inputs, batch_size)
        return float(kl_divergence(reference, perturbed))
    finally:
        weight.data.copy_(original)


@contextlib.contextmanager
def _pruned_weights_kept(model: nn.Module) -> Iterator[None]:
    """Afterwards, put back the ``weight`` tensor of each pruned module (its pruning hook rewrites it at every call)."""
    kept = {
        module: module.__dict__["weight"]
        for module in model.modules()
        if is_weight_pruned(module) and "weight" in module.__dict__
    }
    try:
        yield
    finally:
        for module, weight in kept.items():
            module.weight = weight


def _input_quantizers(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    names: Sequence[str],
    act_bits: Sequence[int],
    inputs: torch.Tensor,
    batch_size: int,
) -> dict[tuple[str, int], ActivationFakeQuant]:
    """Input quantizers of every layer at every activation bit-width, calibrated in one float pass."""
    quantizers = {(name, bits): ActivationFakeQuant(bits) for name in names for bits in act_bits}
    for quantizer in quantizers.values():
        quantizer.observe()

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                for bits in act_bits:
                    quantizers[(name, bits)](args[0])

        return hook

    handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in names]
    try:
        _logits(model, inputs, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    for quantizer in quantizers.values():
        quantizer.finish()
    return quantizers


def _quantize_score(
    model: nn.Module,
    name: str,
    option: Option,
    reference: torch.Tensor,
    inputs: torch.Tensor,
    *,
    batch_size: int,
    input_quantizer: ActivationFakeQuant | None,
    logits: Callable[[], torch.Tensor] | None = None,
) -> float:
    """KL after swapping layer ``name`` for its fake-quant copy; ``logits`` runs the model (default: full forwards)."""
    layer = apply_plan(model, {name: option.name}).get_submodule(name)  # all or nothing: no undo on error
    try:
        if input_quantizer is not None and isinstance(layer, QuantLayer) and layer.input_quantizer is not None:
            layer.input_quantizer.load_state_dict(input_quantizer.state_dict())
        perturbed = logits() if logits is not None else _logits(model, inputs, batch_size)
        return float(kl_divergence(reference, perturbed))
    finally:
        strip_plan(model, [name])


@dataclass
class _Scoring:
    """What scoring one (layer, option) reads: the float outputs to compare with, the inputs, the random state,
    and ``logits(name)``: the model's outputs as they are now, with layer ``name`` perturbed."""

    model: nn.Module
    modules: dict[str, nn.Module]
    reference: torch.Tensor
    inputs: torch.Tensor
    batch_size: int
    generator: torch.Generator
    fractions: dict[int, float]
    input_quantizers: dict[tuple[str, int], ActivationFakeQuant]
    logits: Callable[[str], torch.Tensor]


def _perturb_by_quantizing(ctx: _Scoring, name: str, option: Option) -> float:
    quantizer = ctx.input_quantizers.get((name, option.act_bits or 0))
    return _quantize_score(
        ctx.model,
        name,
        option,
        ctx.reference,
        ctx.inputs,
        batch_size=ctx.batch_size,
        input_quantizer=quantizer,
        logits=functools.partial(ctx.logits, name),
    )


def _perturb_by_masking(ctx: _Scoring, name: str, option: Option) -> float:
    if option.is_float:  # no weight bits to pick a fraction by: a float option is rounded to its format
        return _perturb_by_quantizing(ctx, name, option)
    assert option.weight_bits is not None
    if option.weight_bits not in ctx.fractions:
        raise ValueError(f"mask_fractions has no fraction for {option.weight_bits}-bit weights")
    fraction = ctx.fractions[option.weight_bits]
    return _mask_score(
        ctx.model,
        ctx.modules[name],
        fraction,
        ctx.reference,
        ctx.inputs,
        batch_size=ctx.batch_size,
        generator=ctx.generator,
        logits=functools.partial(ctx.logits, name),
    )


_PERTURB: dict[str, Callable[[_Scoring, str, Option], float]] = {
    "quantize": _perturb_by_quantizing,
    "random_mask": _perturb_by_masking,
}

#: MQE's readings of "perturb one layer" (see the module docstring).
PERTURBATIONS: tuple[str, ...] = tuple(_PERTURB)


def _check_inputs(inputs: Any) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1:
        raise ValueError(
            "MQE supports a model called with one input tensor: inputs must be one batch tensor, "
            f"got {type(inputs).__name__}"
        )


def _score_all(
    model: nn.Module,
    modules: dict[str, nn.Module],
    names: Sequence[str],
    options: Sequence[Option],
    inputs: torch.Tensor,
    *,
    method: str,
    batch_size: int,
    fractions: dict[int, float],
    seed: int,
    progress: bool,
) -> tuple[dict[str, dict[str, float]], str]:
    """Layer -> option -> KL score, the model restored after each; ``fp32`` scores 0 without a forward.

    Also says how the perturbed outputs were computed: ``"suffix"`` or ``"full: <why>"``.
    """
    reference = _logits(model, inputs, batch_size)
    act_bits = sorted({o.act_bits for o in options if o.act_bits is not None}) if method == "quantize" else []
    quantizers = _input_quantizers(model, modules, names, act_bits, inputs, batch_size) if act_bits else {}
    generator = torch.Generator().manual_seed(seed)
    runner, recompute = None, "full: switched off"
    if _SUFFIX_RECOMPUTE:
        runner, recompute = suffix_runner(model, names, inputs.split(batch_size), reference)
    logits = runner.logits if runner is not None else (lambda _name: _logits(model, inputs, batch_size))
    ctx = _Scoring(model, modules, reference, inputs, batch_size, generator, fractions, quantizers, logits)
    perturb = _PERTURB[method]
    scores: dict[str, dict[str, float]] = {}
    work = [(name, option) for name in names for option in options]
    try:
        for name, option in progress_bar(
            work, desc=f"scoring each layer's accuracy impact (MQE, {method})", enabled=progress
        ):
            row = scores.setdefault(name, {})
            row[option.name] = 0.0 if option.float_format == "fp32" else perturb(ctx, name, option)
    finally:
        if runner is not None:
            runner.close()  # the recorded values can be large: free them now
    return scores, recompute


def mqe_sensitivity(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: Sequence[LayerInfo] | Sequence[str],
    options: Sequence[str],
    *,
    method: str = "quantize",
    mask_fractions: Mapping[int, float] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SensitivityTable:
    """Score every layer at every option by the KL divergence its perturbation causes.

    Args:
        model: the float model, called with one input tensor (restored exactly afterwards); it must
            hold no fake-quant layers (call :func:`~ohq_lightning.quant.strip_plan` first).
        inputs: synthetic inputs (one batch tensor, split along its first dimension into the
            model's calls) -- see :mod:`ohq_lightning.sensitivity.synthetic`.
        layers: the layers to score (``LayerInfo`` from :func:`~ohq_lightning.layers.trace_layers`, or names).
        options: option names; float options score 0 for ``fp32`` and are measured for ``bf16``/``fp16``.
        method: one of :data:`PERTURBATIONS`: ``"quantize"`` or ``"random_mask"``.
        mask_fractions: weight bits -> fraction zeroed, for ``"random_mask"``.
        batch_size: inputs per forward (default: all at once).
        seed: seed of the random masks (``"quantize"`` is deterministic without one).
        progress: show a progress bar over layers x options.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> table = mqe_sensitivity(model, torch.randn(16, 8), ["0", "2"], ["w2a8", "w8a8"], progress=False)
        >>> table.scores["0"]["w2a8"] >= table.scores["0"]["w8a8"]
        True
    """
    if method not in _PERTURB:
        raise ValueError(f"unknown MQE method {method!r}; use one of {PERTURBATIONS}")
    _check_inputs(inputs)
    check_float_model(model, "MQE scores")
    parsed = parse_options(options)
    fractions = dict(DEFAULT_MASK_FRACTIONS if mask_fractions is None else mask_fractions)
    names = layer_names(layers)
    modules = find_layers(model, names)
    batch_size = int(batch_size or len(inputs))
    started = time.perf_counter()
    with preserved_state(model), _pruned_weights_kept(model):
        scores, recompute = _score_all(
            model,
            modules,
            names,
            parsed,
            inputs,
            method=method,
            batch_size=batch_size,
            fractions=fractions,
            seed=seed,
            progress=progress,
        )
    meta: dict[str, Any] = {
        "num_inputs": len(inputs),
        "input_shape": list(inputs.shape[1:]),
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "recompute": recompute,
    }
    if method == "random_mask":
        meta["mask_fractions"] = {str(k): v for k, v in fractions.items()}
    return SensitivityTable(method=f"mqe-{method}", scores=scores, meta=meta)
