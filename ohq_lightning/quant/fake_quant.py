"""Fake-quantizers with learnable step sizes (LSQ, Esser et al. 2020) and a straight-through estimator.

Step sizes are learned in log space (``log_scale``; ``scale`` reads ``exp(log_scale)``). The
gradient of ``log_scale`` is scaled so that plain SGD moves a step size as LSQ's SGD does (its
gradient scale ``g = 1 / sqrt(N * Qp)``) while the move is small against the step size, and by at
most a factor ``exp(lr)`` per step when it is not (where linear LSQ would flip its sign). Adam and
AdamW, which normalise every gradient, move a step size by a *relative* amount of about ``lr`` per
step. In linear space they moved it by about ``lr`` in absolute terms, and weight step sizes are
often near 1e-3: one epoch of AdamW at lr 3e-4 on MobileNetV3-large (digits) scaled them by factors
from 0.002 to 5 and cost six points of accuracy; in log space they moved by under 0.5%.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "CLIP_RATIOS",
    "ActivationFakeQuant",
    "FloatCast",
    "WeightFakeQuant",
    "fake_quantize",
    "mse_scale",
    "round_ste",
]

CLIP_RATIOS = tuple(torch.linspace(0.15, 1.0, 35).tolist())  # fractions of the peak an MSE step search tries
_MIN_SCALE = 1e-8
_MAX_SEARCH_VALUES = 1 << 16


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer; the gradient passes straight through."""
    return (torch.round(x) - x).detach() + x


_MAX_LOG_GRAD = 1.0  # SGD at learning rate lr moves a step size by at most a factor exp(lr) per step


class _LogScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; in the backward pass, the gradient times ``factor``, clipped to
    ``[-_MAX_LOG_GRAD, _MAX_LOG_GRAD]`` (exact for any factor, unlike ``(x - x * f).detach() + x * f``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (factor,) = ctx.saved_tensors
        return (grad * factor).clamp(-_MAX_LOG_GRAD, _MAX_LOG_GRAD), None


def _learned_scale(log_scale: torch.Tensor, lsq_factor: float) -> torch.Tensor:
    """``exp(log_scale)`` (at least ``_MIN_SCALE``), with the gradient that makes a small SGD step on
    ``log_scale`` move the step size as LSQ's SGD moves it: ``d log_scale = lsq_factor * dL/ds / s``
    (clipped, so that no single step can overflow the exponential)."""
    scale = log_scale.exp()
    factor = lsq_factor / scale.detach().clamp_min(_MIN_SCALE).square()
    return _LogScaleGrad.apply(log_scale, factor).exp().clamp_min(_MIN_SCALE)


def _log_of(scale: torch.Tensor) -> torch.Tensor:
    return scale.detach().float().abs().clamp_min(_MIN_SCALE).log()


class _LogStepSize:
    """The step-size side shared by both fake-quantizers: the learnable ``log_scale`` is read as
    ``scale``, set with :meth:`set_scale`, and loaded from checkpoints written before step sizes were
    learned in log space (a ``scale`` entry)."""

    log_scale: nn.Parameter

    @property
    def scale(self) -> torch.Tensor:
        """The step size(s) in use, ``exp(log_scale)`` (at least ``1e-8``)."""
        return self.log_scale.exp().clamp_min(_MIN_SCALE)

    def set_scale(self, scale: torch.Tensor | float) -> None:
        """Set the step size(s) (positive; a scalar sets every channel)."""
        with torch.no_grad():
            self.log_scale.copy_(torch.broadcast_to(_log_of(torch.as_tensor(scale)), self.log_scale.shape))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        legacy = state_dict.pop(prefix + "scale", None)
        if legacy is not None and prefix + "log_scale" not in state_dict:
            state_dict[prefix + "log_scale"] = _log_of(legacy)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide signed or unsigned grid."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize ``x`` to the integer grid ``[qmin, qmax]`` of step ``scale`` and map it back (STE)."""
    return round_ste(torch.clamp(x / scale, qmin, qmax)) * scale


def mse_scale(x: torch.Tensor, bits: int, signed: bool, dim: int | None = None) -> torch.Tensor:
    """Step size that minimises the squared quantization error of ``x``, searched over clipping ratios.

    With ``dim`` the search is per slice along that dimension (per output channel for weights),
    and the scales lie along ``dim`` of a tensor that broadcasts against ``x``; without it, one
    scale for the whole tensor. Low bit-widths clip far below the maximum, which is why a plain
    max-based scale fails at 2-4 bits.
    """
    qmin, qmax = int_range(bits, signed)
    x = x.detach().float()
    flat = x.reshape(1, -1) if dim is None else x.transpose(0, dim).reshape(x.shape[dim], -1)
    if signed:
        peak = flat.abs().amax(dim=1).clamp_min(_MIN_SCALE) / max(qmax, -qmin)
    else:
        peak = flat.clamp_min(0).amax(dim=1).clamp_min(_MIN_SCALE) / qmax
    if flat.shape[1] > _MAX_SEARCH_VALUES:  # the peak comes from every value, the search from a strided sample
        flat = flat[:, :: -(-flat.shape[1] // _MAX_SEARCH_VALUES)]
    best_err = torch.full_like(peak, float("inf"))
    best = peak.clone()
    for ratio in CLIP_RATIOS:
        scale = peak * ratio
        err = (torch.clamp(torch.round(flat / scale[:, None]), qmin, qmax) * scale[:, None] - flat).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    if dim is None:
        return best.reshape(())
    shape = [1] * x.dim()
    shape[dim] = -1
    return best.reshape(shape)


class WeightFakeQuant(_LogStepSize, nn.Module):
    """Symmetric per-output-channel weight fake-quant with a learnable step size per channel.

    The step sizes start at the MSE-optimal clipping of the weight they are built for; the learnable
    parameter is their logarithm, ``log_scale`` (see the module docstring).

    Example:
        >>> w = torch.randn(4, 3, 3, 3)
        >>> q = WeightFakeQuant(w, bits=4)
        >>> int(torch.unique(q(w)[0] / q.scale[0]).numel()) <= 16
        True
    """

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = int(bits)
        self.qmin, self.qmax = int_range(self.bits, signed=True)
        self.log_scale = nn.Parameter(_log_of(mse_scale(weight, self.bits, signed=True, dim=0)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight."""
        scale = _learned_scale(self.log_scale, (weight[0].numel() * self.qmax) ** -0.5)
        return fake_quantize(weight, scale.to(weight.dtype), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel=True, symmetric=True"


class ActivationFakeQuant(_LogStepSize, nn.Module):
    """Per-tensor fake-quant of a layer's input, on a signed or an unsigned grid.

    ``signed`` fixes the grid; ``None`` (the default) leaves it to calibration: unsigned when
    every observed input is non-negative, else signed. It starts uncalibrated. In calibration
    mode (:meth:`observe`) it passes inputs through unchanged and records the MSE-optimal step
    size (and the sign) of every batch; ``finish`` turns those into the learnable step size. An
    uncalibrated quantizer that meets its first batch outside calibration initialises itself
    from that batch.
    """

    def __init__(self, bits: int, signed: bool | None = None) -> None:
        super().__init__()
        self.bits = int(bits)
        self.log_scale = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("signed", torch.tensor(bool(signed) if signed is not None else False))
        self.register_buffer("calibrated", torch.tensor(False))
        self._sign_fixed = signed is not None
        self._observing = False
        self._scales: list[torch.Tensor] = []
        self._any_negative = False

    @property
    def int_range(self) -> tuple[int, int]:
        """The integer grid in use (the sign given, or else the one found at calibration)."""
        return int_range(self.bits, bool(self.signed))

    def observe(self) -> None:
        """Start calibration: record statistics, pass inputs through unchanged."""
        self._observing = True
        self._scales = []
        self._any_negative = False

    def _record(self, x: torch.Tensor) -> None:
        self._any_negative = self._any_negative or bool((x < 0).any())
        self._scales.append(torch.stack([mse_scale(x, self.bits, signed=False), mse_scale(x, self.bits, signed=True)]))

    def finish(self) -> None:
        """End calibration: set the step size, and the sign unless it was given, from what was observed."""
        self._observing = False
        if not self._scales:
            return
        signed = bool(self.signed) if self._sign_fixed else self._any_negative
        with torch.no_grad():
            self.signed.fill_(signed)
            self.log_scale.copy_(_log_of(torch.stack(self._scales)[:, int(signed)].mean()))
            self.calibrated.fill_(True)
        self._scales = []

    def calibrate_from(self, x: torch.Tensor) -> None:
        """Calibrate from one batch at once."""
        self.observe()
        self._record(x)
        self.finish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized input (unchanged while observing)."""
        if self._observing:
            self._record(x)
            return x
        if not bool(self.calibrated):
            self.calibrate_from(x)
        qmin, qmax = self.int_range
        factor = (x[0].numel() * qmax) ** -0.5 if x.dim() > 0 and x.shape[0] > 0 else 1.0
        scale = _learned_scale(self.log_scale, factor)
        return fake_quantize(x, scale.to(x.dtype), qmin, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}, calibrated={bool(self.calibrated)}"


class FloatCast(nn.Module):
    """Round a tensor through a narrower float format (``bf16``/``fp16``) and back."""

    def __init__(self, float_format: str) -> None:
        super().__init__()
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if float_format not in dtypes:
            raise ValueError(f"FloatCast supports {sorted(dtypes)}, got {float_format!r}")
        self.float_format = float_format
        self._dtype = dtypes[float_format]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to the narrower format, in its own dtype."""
        return x.to(self._dtype).to(x.dtype)

    def extra_repr(self) -> str:
        return self.float_format
