"""The grids a fake-quant layer learned, in the terms every runtime's int8 kernels take.

Both runtimes quantize activations to unsigned 8 bits and weights to signed 8 bits per output
channel. A learned unsigned 8-bit input grid is the uint8 grid with zero point 0; a learned signed
one (``[-128, 127]``) is the uint8 grid shifted by 128, so it keeps the fast u8s8 kernels. A learned
weight grid is used only at the weight bits it was learned for.
"""

from __future__ import annotations

import torch

from ohq_lightning.quant.export import LearnedQuantization

__all__ = ["input_qparams", "learned_input_qparams", "learned_weight_scale", "qparams_range"]


def input_qparams(bits: int, scale: float, signed: bool) -> tuple[float, int]:
    """``(scale, zero_point)`` of the uint8 grid equal to a ``bits``-bit per-tensor grid of step ``scale``.

    The unsigned 8-bit grid ``[0, 255]`` is itself (zero point 0); the signed 8-bit grid
    ``[-128, 127]`` is the uint8 grid shifted by 128, so it keeps ORT's fast u8s8 kernels.

    Raises:
        ValueError: for other than 8 bits (ORT's integer kernels take 8-bit activations).

    Example:
        >>> input_qparams(8, 0.5, signed=True)
        (0.5, 128)
    """
    if bits != 8:
        raise ValueError(f"ORT's integer kernels take 8-bit activations, not {bits}-bit")
    if not scale > 0:
        raise ValueError(f"the step size must be positive, got {scale}")
    return float(scale), 128 if signed else 0


def learned_input_qparams(found: LearnedQuantization) -> tuple[float, int] | None:
    """The uint8 ``(scale, zero_point)`` of a layer's learned 8-bit input grid; ``None`` when its input
    quantizer was never calibrated or is not 8-bit."""
    if found.input_scale is None or found.input_signed is None or found.act_bits != 8:
        return None
    return input_qparams(8, found.input_scale, found.input_signed)


def qparams_range(qparams: tuple[float, int]) -> tuple[float, float]:
    """The float range ``[low, high]`` whose uint8 grid is exactly ``(scale, zero_point)``.

    Example:
        >>> qparams_range((0.5, 128))
        (-64.0, 63.5)
    """
    scale, zero_point = qparams
    return 0.0 - zero_point * scale, (255 - zero_point) * scale


def learned_weight_scale(found: LearnedQuantization | None, bits: int) -> torch.Tensor | None:
    """A layer's learned per-channel weight steps when they were learned at ``bits``; else ``None``."""
    if found is None or found.weight_scale is None or found.weight_bits != bits:
        return None
    return found.weight_scale
