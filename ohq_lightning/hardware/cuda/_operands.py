"""Synthetic operands of a layer at its real shapes, its float computation, and the int8 / matmul layout helpers.

Shared by the layer kernels (:mod:`.kernels`) and the precision changes between layers
(:mod:`.transitions`): both time torch's eager ops on random tensors of the layer's shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ohq_lightning.plan import LayerInfo

__all__ = [
    "FLOAT_DTYPES",
    "Builder",
    "Built",
    "Operands",
    "absmax_scale",
    "as_double",
    "at_batch",
    "float_forward",
    "fold_rows",
    "is_pointwise",
    "matmul_dims",
    "matmul_rows",
    "quantize_int8",
    "round_up",
    "synthetic_operands",
]

#: The torch dtype of each float kernel.
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Operands:
    """Synthetic fp32 operands of one layer at its real shapes."""

    layer: LayerInfo
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class Built:
    """One implementation set up on its operands: ``run()`` once, ``to_float(out)`` to compare with ``reference``."""

    run: Callable[[], Any]
    to_float: Callable[[Any], torch.Tensor]
    reference: torch.Tensor
    detail: dict[str, Any]


#: Sets an implementation up on a layer's operands.
Builder = Callable[[Operands], Built]


def at_batch(shape: Sequence[int], batch: int) -> list[int]:
    """A per-sample shape (batch dimension 1) at ``batch``."""
    return [batch, *list(shape)[1:]]


def synthetic_operands(layer: LayerInfo, device: torch.device, batch: int, seed: int) -> Operands:
    """Random input, weight (scaled by 1/sqrt(fan-in)) and bias of ``layer`` at ``batch``, on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    fan_in = max(math.prod(layer.weight_shape[1:]), 1)
    x = torch.randn(at_batch(layer.in_shape, batch), generator=generator)
    weight = torch.randn(layer.weight_shape, generator=generator) / math.sqrt(fan_in)
    bias = torch.randn(layer.weight_shape[0], generator=generator) * 0.1 if layer.bias_numel > 0 else None
    return Operands(layer, x.to(device), weight.to(device), None if bias is None else bias.to(device))


def float_forward(layer: LayerInfo, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's float computation (asymmetric 'same' padding is applied as an explicit pad first)."""
    if layer.kind == "linear":
        return F.linear(x, weight, bias)
    top, left, bottom, right = layer.padding
    if (top, left) != (bottom, right):
        x = F.pad(x, (left, right, top, bottom))
        top = left = 0
    return F.conv2d(x, weight, bias, tuple(layer.stride), (top, left), tuple(layer.dilation), layer.groups)


def as_double(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` in float64 (for references), None stays None."""
    return None if tensor is None else tensor.double()


def quantize_int8(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric per-tensor int8 quantization, written contiguously in the tensor's logical layout (eager ops)."""
    scaled = tensor.mul(1.0 / scale).round_().clamp_(-128, 127)
    return scaled.to(torch.int8, memory_format=torch.contiguous_format)


def absmax_scale(tensor: torch.Tensor, top: float) -> float:
    """The symmetric scale that maps ``tensor``'s largest magnitude to ``top``."""
    return max(float(tensor.abs().max()), 1e-12) / top


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


def is_pointwise(layer: LayerInfo) -> bool:
    """A 1x1 convolution without padding or groups: one matmul over (strided) pixels."""
    return (
        layer.kind == "conv"
        and layer.groups == 1
        and list(layer.weight_shape[2:]) == [1, 1]
        and not any(layer.padding)
        and len(layer.in_shape) == 4
    )


def matmul_dims(layer: LayerInfo) -> tuple[int, int]:
    """(K, N) of the layer as a matmul: inner and output dimensions."""
    return math.prod(layer.weight_shape[1:]), layer.weight_shape[0]


def matmul_rows(ops: Operands, source: torch.Tensor) -> Callable[[], torch.Tensor]:
    """How the kernel gathers its [M, K] input rows from ``source`` (the input in matmul layout:
    [..., K] for linear layers, NHWC for 1x1 convolutions; strides gather every s-th pixel)."""
    layer = ops.layer
    k = source.shape[-1]
    if layer.kind == "linear" or list(layer.stride) == [1, 1]:
        flat = source.reshape(-1, k)
        return lambda: flat
    sh, sw = layer.stride
    return lambda: source[:, ::sh, ::sw].reshape(-1, k)


def fold_rows(ops: Operands, rows: torch.Tensor, n: int) -> torch.Tensor:
    """An [M, N] result back in the layer's output layout (NCHW for convolutions, a free view)."""
    if ops.layer.kind == "linear":
        return rows.reshape(*ops.x.shape[:-1], n)
    batch, _, height, width = ops.x.shape
    sh, sw = ops.layer.stride
    return rows.reshape(batch, -(-height // sh), -(-width // sw), n).permute(0, 3, 1, 2)
