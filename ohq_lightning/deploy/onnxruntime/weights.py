"""Integer weights for ORT's int8 kernels: signed 8-bit per output channel, from MSE-optimal or given step sizes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ohq_lightning.quant.fake_quant import int_range, mse_scale

__all__ = ["FixedQuantization", "fixed_weight", "quantize_weight_per_channel"]


@dataclass(frozen=True)
class FixedQuantization:
    """One layer's quantization decided before deployment, in PyTorch's terms (e.g. learned by fake-quant).

    Attributes:
        weight: the layer's float weight as its PyTorch module holds it (output channels first), or
            ``None`` to leave the weights to the builder. The exported graph may hold a multiple of it
            per output channel (a BatchNorm folded in); the builder finds that factor and folds it
            into the step sizes, so the integer weights are exactly ``clip(round(weight / scale))``.
        weight_bits: bits of the symmetric weight grid ``[-2^(b-1), 2^(b-1) - 1]`` (at most 8).
        weight_scale: one positive step size per output channel.
        input_qparams: ``(scale, zero_point)`` of the layer's uint8 input grid (see
            :func:`~ohq_lightning.deploy.input_qparams`), or ``None`` to use the observed input range.
    """

    weight: np.ndarray | None = None
    weight_bits: int | None = None
    weight_scale: np.ndarray | None = None
    input_qparams: tuple[float, int] | None = None


def quantize_weight_per_channel(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed ``bits``-bit per-output-channel weights stored in int8, with MSE-optimal step sizes.

    The step sizes are the ones the fake-quant modules start from (:func:`~ohq_lightning.quant.fake_quant.mse_scale`),
    so a deployed layer quantizes its weights as MQE scored them. All-zero channels get step 1.
    Returns ``(int8 weights, float32 scales)``.
    """
    scale = mse_scale(torch.from_numpy(np.array(weight, dtype=np.float32)), bits, signed=True, dim=0)
    scale = scale.reshape(-1).numpy()
    alive = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1) > 0
    scale = np.where(alive, scale, 1.0).astype(np.float32)
    qmin, qmax = int_range(bits, signed=True)
    shaped = scale.reshape(-1, *[1] * (weight.ndim - 1))
    return np.clip(np.round(weight / shaped), qmin, qmax).astype(np.int8), scale


def fixed_weight(
    tag: str, exported: np.ndarray, weight: np.ndarray, scale: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Integer weights ``clip(round(weight / scale))`` and the step sizes that make them ``exported``.

    ``exported`` is the graph's weight (output channels first); it is ``weight`` times a factor per
    output channel (1, or a folded BatchNorm's ``gamma / sqrt(var + eps)``), which goes into the step
    size (a negative factor negates the integers). Returns ``None``, with a warning, when ``exported``
    is not such a multiple (a layer that transforms its weight, such as timm's ``StdConv2d``).
    """
    weight = np.asarray(weight, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    if weight.shape != exported.shape or scale.shape != (weight.shape[0],) or not (scale > 0).all():
        warnings.warn(
            f"layer {tag!r}: the given weight or step sizes do not fit the exported weight; re-quantizing",
            stacklevel=3,
        )
        return None
    factor = _channel_factor(exported, weight)
    if factor is None:
        warnings.warn(
            f"layer {tag!r}: the exported weight is not a per-channel multiple of the layer's weight (the layer "
            "transforms its weight); its given step sizes cannot be deployed, so its weights are re-quantized",
            stacklevel=3,
        )
        return None
    qmin, qmax = int_range(bits, signed=True)
    shaped = scale.reshape(-1, *[1] * (weight.ndim - 1))
    ints = np.clip(np.round(weight / shaped), qmin, qmax)
    alive = np.abs(factor) > 1e-12
    sign = np.where(factor < 0, -1.0, 1.0).reshape(shaped.shape)
    ints = np.where(alive.reshape(shaped.shape), ints * sign, 0.0)
    step = np.where(alive, np.abs(factor) * scale, scale).astype(np.float32)
    return np.clip(ints, -128, 127).astype(np.int8), step


def _channel_factor(exported: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """The per-output-channel factor ``k`` with ``exported = k * weight``, or ``None`` when there is none."""
    flat_w = weight.reshape(len(weight), -1).astype(np.float64)
    flat_e = exported.reshape(len(exported), -1).astype(np.float64)
    norm = (flat_w**2).sum(axis=1)
    factor = np.where(norm > 0, (flat_w * flat_e).sum(axis=1) / np.where(norm > 0, norm, 1.0), 1.0)
    residual = np.abs(flat_e - factor[:, None] * flat_w).max(axis=1)
    if (residual > 1e-4 * np.abs(flat_e).max(axis=1) + 1e-30).any():
        return None
    return factor
