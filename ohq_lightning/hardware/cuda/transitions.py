"""The precision changes around a layer (quantize, dequantize, half casts), each timed at its own shape.

The cost table charges ``transition_ms[l]``, the boundary after layer ``l``, as half of (quantizing
the next layer's input into the int8 layout its kernel reads + dequantizing ``l``'s int8 output to
fp32): an integer run of layers pays one quantize on entry and one dequantize on exit, which the
two halves at its ends approximate. The half casts are measured but not charged (see
docs/notes/cuda.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ohq_lightning.hardware.cuda._operands import FLOAT_DTYPES, absmax_scale, at_batch, quantize_int8
from ohq_lightning.hardware.cuda.timer import Kernel
from ohq_lightning.plan import LayerInfo

__all__ = ["transition_kernels"]


def _dequantize_nhwc(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).to(torch.float32).mul_(scale)


def _integer_kernels(x: torch.Tensor, y: torch.Tensor) -> list[Kernel]:
    """``quantize`` of the fp32 input ``x`` and ``dequantize`` of the int8 output (``y`` quantized)."""
    in_text, out_text = "x".join(map(str, x.shape)), "x".join(map(str, y.shape))
    scale, out_scale = absmax_scale(x, 127.0), absmax_scale(y, 127.0)
    if x.dim() == 4:  # NCHW float -> NHWC int8, the layout the int8 conv kernels read
        quantize, key = (lambda: quantize_int8(x.permute(0, 2, 3, 1), scale)), f"quantize|nchw->nhwc|{in_text}"
    else:
        quantize, key = (lambda: quantize_int8(x, scale)), f"quantize|{in_text}"
    kernels = [Kernel("quantize", "eager", key, quantize, {"shape": list(x.shape)})]
    if y.dim() == 4:  # NHWC int8 -> float, NCHW-shaped
        y_q = quantize_int8(y.permute(0, 2, 3, 1), out_scale)
        dequantize, key = (lambda: _dequantize_nhwc(y_q, out_scale)), f"dequantize|nhwc->nchw|{out_text}"
    else:
        y_q = quantize_int8(y, out_scale)
        dequantize, key = (lambda: y_q.to(torch.float32).mul_(out_scale)), f"dequantize|{out_text}"
    kernels.append(Kernel("dequantize", "eager", key, dequantize, {"shape": list(y.shape)}))
    return kernels


def _cast_kernels(x: torch.Tensor, y: torch.Tensor, half: str) -> list[Kernel]:
    """``cast_in:<half>`` (fp32 -> half at the input) and ``cast_out:<half>`` (half -> fp32 at the output)."""
    in_text, out_text = "x".join(map(str, x.shape)), "x".join(map(str, y.shape))
    dtype = FLOAT_DTYPES[half]
    y_half = y.to(dtype)
    cast_out = functools.partial(y_half.to, torch.float32)
    at_input, at_output = {"shape": list(x.shape)}, {"shape": list(y.shape)}
    return [
        Kernel(f"cast_in:{half}", "eager", f"cast|fp32->{half}|{in_text}", lambda: x.to(dtype), at_input),
        Kernel(f"cast_out:{half}", "eager", f"cast|{half}->fp32|{out_text}", cast_out, at_output),
    ]


def transition_kernels(
    layer: LayerInfo,
    *,
    device: torch.device | str = "cpu",
    batch: int = 1,
    seed: int = 0,
    integer: bool = True,
    halves: Sequence[str] = (),
) -> list[Kernel]:
    """The precision changes around ``layer``, each as a kernel at its own shape.

    With ``integer``: ``quantize`` (the fp32 input into the int8 layout the layer's int8 kernels
    read: NHWC rows for convolutions) and ``dequantize`` (the layer's int8 output back to fp32,
    NCHW-shaped). For each half format in ``halves`` (``"fp16"``, ``"bf16"``): ``cast_in:<half>``
    (fp32 -> half at the input) and ``cast_out:<half>`` (half -> fp32 at the output).
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(at_batch(layer.in_shape, batch), generator=generator).to(device)
    y = torch.randn(at_batch(layer.out_shape, batch), generator=generator).to(device)
    kernels = _integer_kernels(x, y) if integer else []
    for half in halves:
        kernels.extend(_cast_kernels(x, y, half))
    return kernels
