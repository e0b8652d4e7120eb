"""Each layer's torch kernel per precision, built on synthetic operands and checked before it is timed.

The kernels are torch's own, as torch eager runs them: ``F.conv2d`` / ``F.linear`` in fp32, fp16
and bf16; for int8, ``torch._int_mm`` (linear layers and 1x1 convolutions, a requantizing eager
epilogue) and ``torch.ops.quantized.conv2d`` (cuDNN's int8 convolution, groups 1); for fp8,
``torch._scaled_mm``. Depthwise and grouped convolutions have no int8 kernel in torch: they get a
reason instead of a builder. Every implementation is run once and checked against a float64
reference computed from the same (quantized) operands, so a timing always belongs to a kernel that
computes the layer. Details and the reasons behind each padding rule: docs/notes/cuda.md.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ohq_lightning.hardware.cuda._operands import (
    FLOAT_DTYPES,
    Builder,
    Built,
    Operands,
    absmax_scale,
    as_double,
    float_forward,
    fold_rows,
    is_pointwise,
    matmul_dims,
    matmul_rows,
    quantize_int8,
    round_up,
    synthetic_operands,
)
from ohq_lightning.hardware.cuda.options import KERNELS
from ohq_lightning.hardware.cuda.timer import Kernel, noop
from ohq_lightning.plan import LayerInfo

__all__ = ["implementations", "layer_kernels", "layer_key", "probe", "short_error"]

#: Largest relative L2 error (vs a float64 reference on the same quantized operands) a kernel may show.
_TOLERANCE = {"fp32": 1e-2, "fp16": 1e-2, "bf16": 5e-2, "int8": 5e-2, "fp8": 1e-1}
_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA: "self.size(0) needs to be greater than 16"
_INT_MM_PADDED_ROWS = 32
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
#: torch warns that quantized tensors (which its int8 convolution needs) are deprecated.
_QUANTIZED_TENSOR_WARNING = r"torch\.quantize_per_tensor.*deprecated"


# ----------------------------------------------------------------------------- builders


def _build_float(ops: Operands, kernel: str) -> Built:
    dtype = FLOAT_DTYPES[kernel]
    x, weight = ops.x.to(dtype), ops.weight.to(dtype)
    bias = None if ops.bias is None else ops.bias.to(dtype)
    reference = float_forward(ops.layer, x.double(), weight.double(), as_double(bias))
    run = functools.partial(float_forward, ops.layer, x, weight, bias)
    return Built(run, lambda out: out, reference, {"dtype": str(dtype).removeprefix("torch.")})


def _padded_input(
    rows: Callable[[], torch.Tensor], m: int, k: int, k_padded: int, detail: dict[str, Any]
) -> Callable[[], torch.Tensor]:
    """The int8 input rows zero-padded to what torch._int_mm takes (prepared once, outside the timed call)."""
    if m >= _INT_MM_MIN_ROWS and k_padded == k:
        return rows
    m_padded = _INT_MM_PADDED_ROWS if m < _INT_MM_MIN_ROWS else m
    first = rows()
    padded = torch.zeros(m_padded, k_padded, dtype=torch.int8, device=first.device)
    padded[:m, :k] = first
    detail["input_padded_to"] = [m_padded, k_padded]
    return lambda: padded


def _build_int_mm(ops: Operands) -> Built:
    """int8 linear / 1x1 conv: torch._int_mm (int8 x int8 -> int32) plus a requantizing epilogue.

    torch._int_mm on CUDA takes more than 16 rows and inner and output dimensions that are
    multiples of 8. Output channels are padded with zero weights ahead of time (the output is
    read as a view). Too few rows or an inner dimension off the multiple pad the input with zeros:
    that padded matrix is prepared outside the timed call, as a quantize step writing into a
    zero-padded buffer would leave it.
    """
    layer = ops.layer
    k, n = matmul_dims(layer)
    k_padded, n_padded = round_up(k, 8), round_up(n, 8)
    weight = ops.weight.reshape(n, k)
    w_scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # per output channel
    w_q = torch.round(weight / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    x_scale = absmax_scale(ops.x, 127.0)
    x_q = quantize_int8(ops.x.permute(0, 2, 3, 1) if layer.kind != "linear" else ops.x, x_scale)
    rows = matmul_rows(ops, x_q)
    m = rows().shape[0]
    detail: dict[str, Any] = {"weight_scale": "per output channel", "rows": m, "epilogue": "eager, unfused"}
    rows = _padded_input(rows, m, k, k_padded, detail)
    if n_padded != n:
        detail["output_channels_padded_to"] = n_padded
    x_deq = x_q.double() * x_scale
    if layer.kind != "linear":
        x_deq = x_deq.permute(0, 3, 1, 2)
    w_deq = (w_q.double() * w_scale.double()[:, None]).reshape(layer.weight_shape)
    reference = float_forward(layer, x_deq, w_deq, as_double(ops.bias))
    out_scale = absmax_scale(reference, 127.0)
    w_t = torch.zeros(n_padded, k_padded, dtype=torch.int8, device=x_q.device)
    w_t[:n, :k] = w_q
    w_t = w_t.t()  # [K, N], column-major: the layout cuBLASLt's int8 kernel takes
    multiplier = torch.zeros(n_padded, device=x_q.device)
    multiplier[:n] = x_scale * w_scale / out_scale
    bias_q = torch.zeros(n_padded, device=x_q.device)
    if ops.bias is not None:
        bias_q[:n] = ops.bias / out_scale

    def run() -> torch.Tensor:
        accumulated = torch._int_mm(rows(), w_t)
        requantized = torch.addcmul(bias_q, accumulated.to(torch.float32), multiplier)
        return requantized.round_().clamp_(-128, 127).to(torch.int8)

    return Built(run, lambda out: fold_rows(ops, out[:m, :n].double() * out_scale, n), reference, detail)


def _build_quantized_conv(ops: Operands) -> Built:
    """int8 conv (groups 1): torch.ops.quantized.conv2d, cuDNN's int8 convolution on CUDA.

    On a CPU the same op runs on fbgemm/oneDNN, which need unsigned activations (zero point 128).
    """
    layer = ops.layer
    on_cuda = ops.x.device.type == "cuda"
    act_dtype, zero = (torch.qint8, 0) if on_cuda else (torch.quint8, 128)
    x_scale = absmax_scale(ops.x, 127.0)
    w_scale = absmax_scale(ops.weight, 127.0)
    top, left, _, _ = layer.padding
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_QUANTIZED_TENSOR_WARNING, category=UserWarning)
        q_weight = torch.quantize_per_tensor(ops.weight, w_scale, 0, torch.qint8)
        packed = torch.ops.quantized.conv2d_prepack(
            q_weight, ops.bias, list(layer.stride), [top, left], list(layer.dilation), layer.groups
        )
        q_x = torch.quantize_per_tensor(ops.x, x_scale, zero, act_dtype).contiguous(memory_format=torch.channels_last)
        reference = float_forward(layer, q_x.dequantize().double(), q_weight.dequantize().double(), as_double(ops.bias))
    out_scale = absmax_scale(reference, 127.0)
    run = functools.partial(torch.ops.quantized.conv2d, q_x, packed, out_scale, zero)
    detail = {
        "backend": "cudnn" if on_cuda else torch.backends.quantized.engine,
        "weight_scale": "per tensor",
        "activations": str(act_dtype).removeprefix("torch."),
        "layout": "NHWC",
    }
    return Built(run, lambda out: out.dequantize(), reference, detail)


def _build_scaled_mm(ops: Operands) -> Built:
    """fp8 linear / 1x1 conv: cast the input to float8_e4m3fn, torch._scaled_mm with fp32 output."""
    layer = ops.layer
    k, n = matmul_dims(layer)
    fp8 = torch.float8_e4m3fn
    n_padded = round_up(n, 16)  # zero weights ahead of time; the output is read as a view
    weight = ops.weight.reshape(n, k)
    w_scale = absmax_scale(weight, _FP8_MAX)
    w_fp8 = (weight / w_scale).to(fp8)
    w_t = torch.zeros(n_padded, k, device=weight.device).to(fp8)
    w_t[:n] = w_fp8
    w_t = w_t.t()  # [K, N], column-major as _scaled_mm wants
    x_scale = absmax_scale(ops.x, _FP8_MAX)
    source = ops.x.permute(0, 2, 3, 1) if layer.kind != "linear" else ops.x  # NHWC view for convolutions
    sh, sw = layer.stride if layer.kind != "linear" else (1, 1)
    scale_a = torch.tensor(x_scale, dtype=torch.float32, device=ops.x.device)
    scale_b = torch.tensor(w_scale, dtype=torch.float32, device=ops.x.device)
    bias = None
    if ops.bias is not None:
        bias = torch.zeros(n_padded, dtype=torch.bfloat16, device=weight.device)
        bias[:n] = ops.bias
    inverse = 1.0 / x_scale

    def run() -> torch.Tensor:
        pixels = source[:, ::sh, ::sw] if (sh, sw) != (1, 1) else source
        rows = pixels.mul(inverse).to(fp8, memory_format=torch.contiguous_format).reshape(-1, k)
        return torch._scaled_mm(rows, w_t, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=torch.float32)

    x_deq = source.mul(inverse).to(fp8).double() * x_scale
    if layer.kind != "linear":
        x_deq = x_deq.permute(0, 3, 1, 2)
    w_deq = (w_fp8.double() * w_scale).reshape(layer.weight_shape)
    reference = float_forward(layer, x_deq, w_deq, as_double(None if bias is None else bias[:n].float()))
    detail: dict[str, Any] = {"format": "float8_e4m3fn", "scales": "per tensor", "output": "float32"}
    if n_padded != n:
        detail["output_channels_padded_to"] = n_padded
    return Built(run, lambda out: fold_rows(ops, out[:, :n].double(), n), reference, detail)


# ----------------------------------------------------------------------------- which implementations apply

_Found = tuple[dict[str, Builder], dict[str, str]]


def _float_implementations(layer: LayerInfo, kernel: str) -> _Found:
    return {"F.linear" if layer.kind == "linear" else "F.conv2d": functools.partial(_build_float, kernel=kernel)}, {}


def _int8_implementations(layer: LayerInfo, kernel: str) -> _Found:
    linear = layer.kind == "linear"
    builders: dict[str, Builder] = {}
    reasons: dict[str, str] = {}
    if linear or is_pointwise(layer):
        builders["torch._int_mm"] = _build_int_mm
    if layer.kind == "conv":
        top, left, bottom, right = layer.padding
        if (top, left) == (bottom, right):
            builders["torch.ops.quantized.conv2d"] = _build_quantized_conv
        else:
            reasons["torch.ops.quantized.conv2d"] = f"takes symmetric padding only, the layer pads {layer.padding}"
    elif not linear:
        reasons["*"] = (
            f"no int8 CUDA kernel in torch for a {layer.kind} convolution (groups={layer.groups}): cuDNN's int8 "
            "convolution is limited to groups=1 and torch._int_mm computes one plain matmul"
        )
    return builders, reasons


def _fp8_implementations(layer: LayerInfo, kernel: str) -> _Found:
    k = matmul_dims(layer)[0]
    if not (layer.kind == "linear" or is_pointwise(layer)):
        return {}, {
            "*": "torch has no fp8 convolution: torch._scaled_mm covers linear layers and 1x1 convolutions without "
            "padding or groups"
        }
    if k % 16:
        return {}, {"torch._scaled_mm": f"needs an inner dimension that is a multiple of 16 (K={k})"}
    return {"torch._scaled_mm": _build_scaled_mm}, {}


#: kernel -> the rule that says which implementations a layer has on it.
_IMPLEMENTATIONS: dict[str, Callable[[LayerInfo, str], _Found]] = {
    "fp32": _float_implementations,
    "fp16": _float_implementations,
    "bf16": _float_implementations,
    "int8": _int8_implementations,
    "fp8": _fp8_implementations,
}


def implementations(layer: LayerInfo, kernel: str) -> tuple[dict[str, Builder], dict[str, str]]:
    """The implementations torch has for ``layer`` at ``kernel``, and why the others do not apply.

    Returns ``(builders, reasons)``: implementation name -> builder, and implementation (or
    ``"*"``) -> why there is none. Shape rules only; whether a kernel really runs on a device is
    found by running it (:func:`layer_kernels`).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {KERNELS}")
    return _IMPLEMENTATIONS[kernel](layer, kernel)


# ----------------------------------------------------------------------------- probing


def layer_key(layer: LayerInfo, batch: int, kernel: str, impl: str) -> str:
    """The timing-cache key of ``layer`` at ``batch`` on one kernel and implementation."""
    return f"{layer.signature()}|batch={batch}|{kernel}|{impl}"


def _relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    result, reference = result.double(), reference.double()
    return float((result - reference).norm() / reference.norm().clamp_min(1e-30))


def short_error(error: BaseException) -> str:
    """An exception in one line: its type and the first line of its message (at most 300 characters)."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:300]}"


def probe(
    ops: Operands, kernel: str, impl: str, builder: Builder, key: str, synchronize: Callable[[], object]
) -> Kernel | str:
    """Build one implementation, run it once and check its result: a Kernel, or why it cannot be timed."""
    try:
        built = builder(ops)
        out = built.run()
        synchronize()
        error = _relative_error(built.to_float(out), built.reference)
    except Exception as failure:  # the device or torch build has no such kernel, or refuses these shapes
        return f"failed on {ops.x.device.type}: {short_error(failure)}"
    tolerance = _TOLERANCE[kernel]
    if not error <= tolerance:
        return f"its result is off the float reference by {error:.1%} (tolerance {tolerance:.0%}); not timed"
    return Kernel(kernel, impl, key, built.run, {**built.detail, "relative_error": error})


def layer_kernels(
    layer: LayerInfo,
    kernel: str,
    *,
    device: torch.device | str = "cpu",
    batch: int = 1,
    seed: int = 0,
    synchronize: Callable[[], object] = noop,
) -> tuple[list[Kernel], dict[str, str]]:
    """Every implementation of ``layer`` at ``kernel`` that runs on ``device`` and computes the layer.

    Returns the runnable kernels (each run once and checked against a float64 reference) and,
    per implementation that is not there, the reason. An empty list means the layer has no
    ``kernel`` implementation on this device.
    """
    device = torch.device(device)
    builders, reasons = implementations(layer, kernel)
    kernels: list[Kernel] = []
    if builders:
        ops = synthetic_operands(layer, device, batch, seed)
        for impl, builder in builders.items():
            probed = probe(ops, kernel, impl, builder, layer_key(layer, batch, kernel, impl), synchronize)
            if isinstance(probed, str):
                reasons[impl] = probed
            else:
                kernels.append(probed)
    return kernels, reasons
