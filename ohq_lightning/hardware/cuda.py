"""The measured CUDA target: each layer's real GPU kernel, timed alone at the layer's real shapes.

**What is measured.** For every layer and every kernel its options run on, the layer is rebuilt on
the GPU with synthetic inputs and weights of its real shapes (the batch of the example input, or
``batch_size``) and timed through :func:`~ohq_lightning._util.timing.time_interleaved`: each
timed sample runs the kernel back to back enough times to last ``min_sample_ms`` and ends with
``torch.cuda.synchronize``, and the kernels of one layer are timed in turn (a, b, a, b, ...) so that
drift hits them alike. The kernels are torch's own, as torch eager runs them:

* ``fp32`` / ``fp16`` / ``bf16``: ``F.conv2d`` / ``F.linear`` with input, weight and bias in that
  dtype (cuDNN / cuBLAS; fp32 convolutions use TF32 where torch's flags allow it, recorded in the
  table's meta).
* ``w8a8`` (and ``w4a8``/``w2a8``, whose weights sit on a coarser grid inside int8 and run on the
  same kernel): int8 activations in, int8 activations out, where torch has an int8 kernel:

  - linear layers and 1x1 convolutions (groups 1, no padding; strides gather pixels first) as an
    int8 x int8 -> int32 matmul in ``torch._int_mm`` (cuBLASLt, int8 tensor cores), NHWC rows,
    per-output-channel weight scales, then the requantizing epilogue in eager ops (cast, multiply-
    add, round, clamp, cast). ``torch._int_mm`` on CUDA needs more than 16 rows and inner and
    output dimensions that are multiples of 8: output channels are padded with zero weights ahead
    of time; too few rows (batch-1 classifiers) or an inner dimension off the multiple zero-pad
    the input, that padded matrix prepared outside the timed call (as a quantize step writing into
    a padded buffer would leave it; ``meta["kernel_details"]`` records the padding);
  - convolutions with groups 1 and symmetric padding in ``torch.ops.quantized.conv2d`` (cuDNN's
    int8 convolution; per-tensor symmetric scales; a deprecated, experimental path of torch).

  Depthwise and grouped convolutions have no int8 CUDA kernel in torch (cuDNN's quantized
  convolution is limited to groups 1, and a grouped convolution is not one matmul): their int8
  entries are ``source="unsupported"`` with no latency, and the table's ``meta["unsupported"]``
  says why, per layer and option. So does any implementation that fails on the device. Where a
  layer has two int8 implementations, the faster one counts (``meta["implementations"]``).
* ``fp8`` (compute capability 8.9+): linear layers and 1x1 convolutions whose inner dimension is a
  multiple of 16 in ``torch._scaled_mm`` (float8_e4m3fn, per-tensor scales), float in and float
  out: the cast of the input to fp8 is part of the timed call. Refused until the plan format
  (:class:`~ohq_lightning.plan.Option`) can name an 8-bit float option.

Every implementation is run once before timing and its result checked against a float64
reference computed from the same (quantized) operands, so a timing always belongs to a kernel
that computes the layer. Entries are ``median time per call x the layer's calls per forward``.

**What is approximated.** The cost model is the table's (:class:`~ohq_lightning.plan.CostTable`):

* ``transition_ms[l]``, the boundary after layer ``l``: half of (quantizing the next layer's input
  from fp32 into the int8 layout its kernel reads + dequantizing ``l``'s int8 output to fp32), each
  timed at its own shape. A plan pays a boundary when exactly one side is integer; an integer run
  of layers pays one quantize on entry and one dequantize on exit, which the two halves at its two
  ends approximate (exactly when neighbouring shapes match). Entering int8 at the first layer and
  leaving it at the last have no boundary: they are added to those layers' int8 entries.
  Changing layout or format between two int8 layers is not charged.
* fp16/bf16 layers are timed with their operands already in their dtype (a network run in half
  precision throughout). The cost model charges nothing when float formats meet, so a lone half
  layer among fp32 layers is predicted faster than it runs; the measured casts (fp32 -> half at
  the input, half -> fp32 at the output) are recorded per layer in ``meta["float_cast_ms"]``.
* ``base_latency_ms``, the rest of the network (activations, adds, pooling, launches): measured
  when the model and its example input are given, as the whole network's eager fp32 forward on the
  GPU minus the sum of its layers' fp32 entries. It is measured at fp32; how it changes when the
  layers around it change precision is not modelled. Without the model it is left out (``None``)
  and ``meta["base"]`` says so.

**Energy** (``energy=True``): NVML's total-energy counter, read around each layer's kernel run back
to back (:class:`~ohq_lightning.hardware.energy.NvmlEnergyMeter`): the board's energy per call,
static power included; transitions carry none. Where NVML or its counter is unavailable, energy is
absent (``None``) with the reason in ``meta["energy"]``, never estimated.

Measurements are cached per GPU (name, compute capability, torch, CUDA and cuDNN versions, TF32
flags, timing settings) and keyed by layer signature, batch, kernel and implementation, so a
second search on the same GPU measures nothing again. Without a CUDA device the target can be
built, but :meth:`CUDATarget.costs` raises ``RuntimeError("no CUDA device: ...")``; everything but
the GPU timing runs on any device through :meth:`CUDATarget.measure_on`.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ohq_lightning._util.cache import cache_root
from ohq_lightning._util.jsonable import JsonMixin
from ohq_lightning._util.progress import progress_bar
from ohq_lightning._util.timing import Timing, TimingSettings, time_interleaved
from ohq_lightning.hardware.cache import TimingCache
from ohq_lightning.hardware.energy import NvmlEnergyMeter
from ohq_lightning.plan import UNSUPPORTED, CostTable, LayerCost, LayerInfo, Option

__all__ = [
    "CUDA_OPTIONS",
    "FP8_MIN_CAPABILITY",
    "KERNELS",
    "CUDATarget",
    "DeviceInfo",
    "Kernel",
    "Timer",
    "check_options",
    "implementations",
    "kernel_of",
    "layer_kernels",
    "synchronized_timer",
    "transition_kernels",
]

#: The options the cuda target offers by default (``fp8`` joins them on sm_89+ once plans can name it).
CUDA_OPTIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "w8a8")
#: ``torch._scaled_mm`` (fp8) needs compute capability 8.9 (Ada) or newer.
FP8_MIN_CAPABILITY: tuple[int, int] = (8, 9)
#: The kernels options run on.
KERNELS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "fp8")

_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Largest relative L2 error (vs a float64 reference on the same quantized operands) a kernel may show.
_TOLERANCE = {"fp32": 1e-2, "fp16": 1e-2, "bf16": 5e-2, "int8": 5e-2, "fp8": 1e-1}
_METHOD = "cuda-isolated-kernels-v1"  # bump when what an entry measures changes, so old caches are not reused
_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA: "self.size(0) needs to be greater than 16"
_INT_MM_PADDED_ROWS = 32
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _noop() -> None:
    return None


# ----------------------------------------------------------------------------- options


def kernel_of(option: str) -> str:
    """The kernel an option runs on: ``fp32``, ``fp16``, ``bf16``, ``int8`` or ``fp8``.

    Integer options with 8-bit activations run on the int8 kernel (``w4a8``'s weights sit on a
    coarser grid inside int8); other options (weight-only, sub-8-bit activations) are refused.

    Example:
        >>> kernel_of("w4a8"), kernel_of("bf16")
        ('int8', 'bf16')
    """
    if isinstance(option, str) and option.strip().lower() == "fp8":
        return "fp8"
    parsed = Option.parse(option)
    if parsed.float_format is not None:
        return parsed.float_format
    if parsed.act_bits == 8:
        return "int8"
    raise ValueError(
        f"option {parsed.name!r} cannot run on the cuda target: it offers fp32, fp16, bf16, integer options "
        "with 8-bit activations (w8a8; w4a8 and w2a8 run on the int8 kernel) and fp8 on sm_89+ GPUs"
    )


def _plan_knows(name: str) -> bool:
    try:
        Option.parse(name)
    except ValueError:
        return False
    return True


def check_options(names: Any, capability: tuple[int, int] | None = None) -> tuple[str, ...]:
    """Validate option names for the cuda target and return them normalised (lower case, in order).

    ``capability`` is the GPU's compute capability when known: ``fp8`` on a GPU older than
    :data:`FP8_MIN_CAPABILITY` is an error, and so is ``fp8`` while the plan format cannot name it.
    """
    if isinstance(names, str):
        names = [names]
    try:
        names = list(names)
    except TypeError:
        raise ValueError(f"options must be a list of names such as ['fp16', 'w8a8'], got {names!r}") from None
    if not names:
        raise ValueError("options must name at least one precision, e.g. ['fp16', 'w8a8']")
    checked: list[str] = []
    for name in names:
        if kernel_of(name) == "fp8":
            if capability is not None and tuple(capability) < FP8_MIN_CAPABILITY:
                raise ValueError(
                    f"option 'fp8' needs a GPU of compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} "
                    f"or newer (Ada, Hopper, Blackwell): torch._scaled_mm has no fp8 kernel for sm_"
                    f"{capability[0]}{capability[1]}"
                )
            if not _plan_knows("fp8"):
                raise ValueError(
                    "option 'fp8' cannot be planned yet: the plan format (ohq_lightning.plan.Option) has no 8-bit "
                    "float option, so no plan, sensitivity or fake-quant stage could name it; the cuda target can "
                    "time fp8 (torch._scaled_mm) once it does"
                )
            canonical = "fp8"
        else:
            canonical = Option.parse(name).name
        if canonical in checked:
            raise ValueError(f"option {canonical!r} is listed twice")
        checked.append(canonical)
    return tuple(checked)


# ----------------------------------------------------------------------------- device


@dataclass(frozen=True)
class DeviceInfo(JsonMixin):
    """What a CUDA measurement depends on besides the layer: the GPU and the software that drives it."""

    name: str
    capability: tuple[int, int]
    torch_version: str
    cuda_version: str | None
    cudnn_version: int | None

    @classmethod
    def of(cls, device: torch.device | int) -> DeviceInfo:
        """Describe a CUDA device (needs the device)."""
        props = torch.cuda.get_device_properties(device)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return cls(props.name, (int(props.major), int(props.minor)), torch.__version__, torch.version.cuda, cudnn)


def _tf32_flags() -> dict[str, bool]:
    return {
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }


def _visible_capability(index: int) -> tuple[int, int] | None:
    """The compute capability of CUDA device ``index``, or None without one (initialises CUDA)."""
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def _nvml_index(device: torch.device) -> int:
    """The NVML index of a CUDA device (honours CUDA_VISIBLE_DEVICES where torch can map it)."""
    try:
        return int(torch.cuda._get_nvml_device_index(device))
    except Exception:  # private helper: absent in some versions, or UUID mapping without NVML
        return int(device.index or 0)


# ----------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class Kernel:
    """One runnable operation on a device: a layer at one kernel and implementation, or a transition.

    ``run()`` performs one call (asynchronously on a GPU); ``key`` names it in the timing cache;
    ``detail`` says how it was set up (padding, scales, backend).
    """

    name: str
    impl: str
    key: str
    run: Callable[[], Any]
    detail: Mapping[str, Any] = field(default_factory=dict)


#: Times kernels (in turn, on one device) and returns each one's time per call.
Timer = Callable[[Sequence[Kernel], TimingSettings], list[Timing]]


@dataclass
class _Operands:
    """Synthetic fp32 operands of one layer at its real shapes."""

    layer: LayerInfo
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class _Built:
    run: Callable[[], Any]
    to_float: Callable[[Any], torch.Tensor]
    reference: torch.Tensor
    detail: dict[str, Any]


_Builder = Callable[[_Operands], _Built]


def _at_batch(shape: Sequence[int], batch: int) -> list[int]:
    """A per-sample shape (batch dimension 1) at ``batch``."""
    return [batch, *list(shape)[1:]]


def _operands(layer: LayerInfo, device: torch.device, batch: int, seed: int) -> _Operands:
    generator = torch.Generator().manual_seed(seed)
    fan_in = max(math.prod(layer.weight_shape[1:]), 1)
    x = torch.randn(_at_batch(layer.in_shape, batch), generator=generator)
    weight = torch.randn(layer.weight_shape, generator=generator) / math.sqrt(fan_in)
    bias = torch.randn(layer.weight_shape[0], generator=generator) * 0.1 if layer.bias_numel > 0 else None
    return _Operands(layer, x.to(device), weight.to(device), None if bias is None else bias.to(device))


def _float_forward(layer: LayerInfo, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's float computation (asymmetric 'same' padding is applied as an explicit pad first)."""
    if layer.kind == "linear":
        return F.linear(x, weight, bias)
    top, left, bottom, right = layer.padding
    if (top, left) != (bottom, right):
        x = F.pad(x, (left, right, top, bottom))
        top = left = 0
    return F.conv2d(x, weight, bias, tuple(layer.stride), (top, left), tuple(layer.dilation), layer.groups)


def _double(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.double()


def _quantize(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric per-tensor int8 quantization, written contiguously in the tensor's logical layout (eager ops)."""
    scaled = tensor.mul(1.0 / scale).round_().clamp_(-128, 127)
    return scaled.to(torch.int8, memory_format=torch.contiguous_format)


def _absmax_scale(tensor: torch.Tensor, top: float) -> float:
    return max(float(tensor.abs().max()), 1e-12) / top


def _is_pointwise(layer: LayerInfo) -> bool:
    """A 1x1 convolution without padding or groups: one matmul over (strided) pixels."""
    return (
        layer.kind == "conv"
        and layer.groups == 1
        and list(layer.weight_shape[2:]) == [1, 1]
        and not any(layer.padding)
        and len(layer.in_shape) == 4
    )


def _matmul_dims(layer: LayerInfo) -> tuple[int, int]:
    """(K, N) of the layer as a matmul: inner and output dimensions."""
    return math.prod(layer.weight_shape[1:]), layer.weight_shape[0]


def _rows(ops: _Operands, source: torch.Tensor) -> Callable[[], torch.Tensor]:
    """How the kernel gathers its [M, K] input rows from ``source`` (the input in matmul layout:
    [..., K] for linear layers, NHWC for 1x1 convolutions; strides gather every s-th pixel)."""
    layer = ops.layer
    k = source.shape[-1]
    if layer.kind == "linear" or list(layer.stride) == [1, 1]:
        flat = source.reshape(-1, k)
        return lambda: flat
    sh, sw = layer.stride
    return lambda: source[:, ::sh, ::sw].reshape(-1, k)


def _fold(ops: _Operands, rows: torch.Tensor, n: int) -> torch.Tensor:
    """An [M, N] result back in the layer's output layout (NCHW for convolutions, a free view)."""
    if ops.layer.kind == "linear":
        return rows.reshape(*ops.x.shape[:-1], n)
    batch, _, height, width = ops.x.shape
    sh, sw = ops.layer.stride
    return rows.reshape(batch, -(-height // sh), -(-width // sw), n).permute(0, 3, 1, 2)


def _build_float(ops: _Operands, kernel: str) -> _Built:
    dtype = _FLOAT_DTYPES[kernel]
    x, weight = ops.x.to(dtype), ops.weight.to(dtype)
    bias = None if ops.bias is None else ops.bias.to(dtype)
    reference = _float_forward(ops.layer, x.double(), weight.double(), _double(bias))
    run = functools.partial(_float_forward, ops.layer, x, weight, bias)
    return _Built(run, lambda out: out, reference, {"dtype": str(dtype).removeprefix("torch.")})


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _build_int_mm(ops: _Operands) -> _Built:
    """int8 linear / 1x1 conv: torch._int_mm (int8 x int8 -> int32) plus a requantizing epilogue.

    torch._int_mm on CUDA takes more than 16 rows and inner and output dimensions that are
    multiples of 8. Output channels are padded with zero weights ahead of time (the output is
    read as a view). Too few rows or an inner dimension off the multiple pad the input with zeros:
    that padded matrix is prepared outside the timed call, as a quantize step writing into a
    zero-padded buffer would leave it.
    """
    layer = ops.layer
    k, n = _matmul_dims(layer)
    k_padded, n_padded = _round_up(k, 8), _round_up(n, 8)
    weight = ops.weight.reshape(n, k)
    w_scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # per output channel
    w_q = torch.round(weight / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    x_scale = _absmax_scale(ops.x, 127.0)
    source = ops.x.permute(0, 2, 3, 1) if layer.kind != "linear" else ops.x
    x_q = _quantize(source, x_scale)
    rows = _rows(ops, x_q)
    m = rows().shape[0]
    detail: dict[str, Any] = {"weight_scale": "per output channel", "rows": m, "epilogue": "eager, unfused"}
    if m < _INT_MM_MIN_ROWS or k_padded != k:
        m_padded = _INT_MM_PADDED_ROWS if m < _INT_MM_MIN_ROWS else m
        padded = torch.zeros(m_padded, k_padded, dtype=torch.int8, device=x_q.device)
        padded[:m, :k] = rows()
        rows = lambda: padded  # noqa: E731
        detail["input_padded_to"] = [m_padded, k_padded]
    if n_padded != n:
        detail["output_channels_padded_to"] = n_padded
    x_deq = x_q.double() * x_scale
    if layer.kind != "linear":
        x_deq = x_deq.permute(0, 3, 1, 2)
    w_deq = (w_q.double() * w_scale.double()[:, None]).reshape(layer.weight_shape)
    reference = _float_forward(layer, x_deq, w_deq, _double(ops.bias))
    out_scale = _absmax_scale(reference, 127.0)
    device = x_q.device
    w_t = torch.zeros(n_padded, k_padded, dtype=torch.int8, device=device)
    w_t[:n, :k] = w_q
    w_t = w_t.t()  # [K, N], column-major: the layout cuBLASLt's int8 kernel takes
    multiplier = torch.zeros(n_padded, device=device)
    multiplier[:n] = x_scale * w_scale / out_scale
    bias_q = torch.zeros(n_padded, device=device)
    if ops.bias is not None:
        bias_q[:n] = ops.bias / out_scale

    def run() -> torch.Tensor:
        accumulated = torch._int_mm(rows(), w_t)
        requantized = torch.addcmul(bias_q, accumulated.to(torch.float32), multiplier)
        return requantized.round_().clamp_(-128, 127).to(torch.int8)

    return _Built(run, lambda out: _fold(ops, out[:m, :n].double() * out_scale, n), reference, detail)


#: torch warns that quantized tensors (which its int8 convolution needs) are deprecated.
_QUANTIZED_TENSOR_WARNING = r"torch\.quantize_per_tensor.*deprecated"


def _build_quantized_conv(ops: _Operands) -> _Built:
    """int8 conv (groups 1): torch.ops.quantized.conv2d, cuDNN's int8 convolution on CUDA.

    On a CPU the same op runs on fbgemm/oneDNN, which need unsigned activations (zero point 128).
    """
    layer = ops.layer
    on_cuda = ops.x.device.type == "cuda"
    act_dtype, zero = (torch.qint8, 0) if on_cuda else (torch.quint8, 128)
    x_scale = _absmax_scale(ops.x, 127.0)
    w_scale = _absmax_scale(ops.weight, 127.0)
    top, left, _, _ = layer.padding
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_QUANTIZED_TENSOR_WARNING, category=UserWarning)
        q_weight = torch.quantize_per_tensor(ops.weight, w_scale, 0, torch.qint8)
        packed = torch.ops.quantized.conv2d_prepack(
            q_weight, ops.bias, list(layer.stride), [top, left], list(layer.dilation), layer.groups
        )
        q_x = torch.quantize_per_tensor(ops.x, x_scale, zero, act_dtype).contiguous(memory_format=torch.channels_last)
        reference = _float_forward(layer, q_x.dequantize().double(), q_weight.dequantize().double(), _double(ops.bias))
    out_scale = _absmax_scale(reference, 127.0)
    run = functools.partial(torch.ops.quantized.conv2d, q_x, packed, out_scale, zero)
    detail = {
        "backend": "cudnn" if on_cuda else torch.backends.quantized.engine,
        "weight_scale": "per tensor",
        "activations": str(act_dtype).removeprefix("torch."),
        "layout": "NHWC",
    }
    return _Built(run, lambda out: out.dequantize(), reference, detail)


def _build_scaled_mm(ops: _Operands) -> _Built:
    """fp8 linear / 1x1 conv: cast the input to float8_e4m3fn, torch._scaled_mm with fp32 output."""
    layer = ops.layer
    k, n = _matmul_dims(layer)
    fp8 = torch.float8_e4m3fn
    n_padded = _round_up(n, 16)  # zero weights ahead of time; the output is read as a view
    weight = ops.weight.reshape(n, k)
    w_scale = _absmax_scale(weight, _FP8_MAX)
    w_fp8 = (weight / w_scale).to(fp8)
    w_t = torch.zeros(n_padded, k, device=weight.device).to(fp8)
    w_t[:n] = w_fp8
    w_t = w_t.t()  # [K, N], column-major as _scaled_mm wants
    x_scale = _absmax_scale(ops.x, _FP8_MAX)
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
    reference = _float_forward(layer, x_deq, w_deq, _double(None if bias is None else bias[:n].float()))
    detail: dict[str, Any] = {"format": "float8_e4m3fn", "scales": "per tensor", "output": "float32"}
    if n_padded != n:
        detail["output_channels_padded_to"] = n_padded
    return _Built(run, lambda out: _fold(ops, out[:, :n].double(), n), reference, detail)


def implementations(layer: LayerInfo, kernel: str) -> tuple[dict[str, _Builder], dict[str, str]]:
    """The implementations torch has for ``layer`` at ``kernel``, and why the others do not apply.

    Returns ``(builders, reasons)``: implementation name -> builder, and implementation (or
    ``"*"``) -> why there is none. Shape rules only; whether a kernel really runs on a device is
    found by running it (:func:`layer_kernels`).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {KERNELS}")
    linear = layer.kind == "linear"
    if kernel in _FLOAT_DTYPES:
        return {"F.linear" if linear else "F.conv2d": functools.partial(_build_float, kernel=kernel)}, {}
    k = _matmul_dims(layer)[0]
    builders: dict[str, _Builder] = {}
    reasons: dict[str, str] = {}
    matmul = linear or _is_pointwise(layer)
    if kernel == "int8":
        if matmul:
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
    # fp8
    if not matmul:
        reasons["*"] = (
            "torch has no fp8 convolution: torch._scaled_mm covers linear layers and 1x1 convolutions without "
            "padding or groups"
        )
    elif k % 16:
        reasons["torch._scaled_mm"] = f"needs an inner dimension that is a multiple of 16 (K={k})"
    else:
        builders["torch._scaled_mm"] = _build_scaled_mm
    return builders, reasons


def _layer_key(layer: LayerInfo, batch: int, kernel: str, impl: str) -> str:
    return f"{layer.signature()}|batch={batch}|{kernel}|{impl}"


def _relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    result, reference = result.double(), reference.double()
    return float((result - reference).norm() / reference.norm().clamp_min(1e-30))


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:300]}"


def _probe(
    ops: _Operands, kernel: str, impl: str, builder: _Builder, key: str, synchronize: Callable[[], object]
) -> Kernel | str:
    """Build one implementation, run it once and check its result: a Kernel, or why it cannot be timed."""
    try:
        built = builder(ops)
        out = built.run()
        synchronize()
        error = _relative_error(built.to_float(out), built.reference)
    except Exception as failure:  # the device or torch build has no such kernel, or refuses these shapes
        return f"failed on {ops.x.device.type}: {_short(failure)}"
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
    synchronize: Callable[[], object] = _noop,
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
        ops = _operands(layer, device, batch, seed)
        for impl, builder in builders.items():
            probed = _probe(ops, kernel, impl, builder, _layer_key(layer, batch, kernel, impl), synchronize)
            if isinstance(probed, str):
                reasons[impl] = probed
            else:
                kernels.append(probed)
    return kernels, reasons


def _dequantize_nhwc(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).to(torch.float32).mul_(scale)


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
    x = torch.randn(_at_batch(layer.in_shape, batch), generator=generator).to(device)
    y = torch.randn(_at_batch(layer.out_shape, batch), generator=generator).to(device)
    in_text, out_text = "x".join(map(str, x.shape)), "x".join(map(str, y.shape))
    at_input, at_output = {"shape": list(x.shape)}, {"shape": list(y.shape)}
    kernels: list[Kernel] = []
    if integer:
        scale, out_scale = _absmax_scale(x, 127.0), _absmax_scale(y, 127.0)
        if x.dim() == 4:  # NCHW float -> NHWC int8, the layout the int8 conv kernels read
            quantize, key = (lambda: _quantize(x.permute(0, 2, 3, 1), scale)), f"quantize|nchw->nhwc|{in_text}"
        else:
            quantize, key = (lambda: _quantize(x, scale)), f"quantize|{in_text}"
        kernels.append(Kernel("quantize", "eager", key, quantize, at_input))
        if y.dim() == 4:  # NHWC int8 -> float, NCHW-shaped
            y_q = _quantize(y.permute(0, 2, 3, 1), out_scale)
            dequantize, key = (lambda: _dequantize_nhwc(y_q, out_scale)), f"dequantize|nhwc->nchw|{out_text}"
        else:
            y_q = _quantize(y, out_scale)
            dequantize, key = (lambda: y_q.to(torch.float32).mul_(out_scale)), f"dequantize|{out_text}"
        kernels.append(Kernel("dequantize", "eager", key, dequantize, at_output))
    for half in halves:
        dtype = _FLOAT_DTYPES[half]
        y_half = y.to(dtype)
        kernels.append(
            Kernel(f"cast_in:{half}", "eager", f"cast|fp32->{half}|{in_text}", lambda d=dtype: x.to(d), at_input)
        )
        kernels.append(
            Kernel(
                f"cast_out:{half}",
                "eager",
                f"cast|{half}->fp32|{out_text}",
                lambda t=y_half: t.to(torch.float32),
                at_output,
            )
        )
    return kernels


# ----------------------------------------------------------------------------- timing


def _repeat(fn: Callable[[], object], count: int, synchronize: Callable[[], object]) -> None:
    for _ in range(count):
        fn()
    synchronize()


def _loop_count(fn: Callable[[], object], synchronize: Callable[[], object], min_sample_ms: float, limit: int) -> int:
    """How many back-to-back calls make one timed sample last about ``min_sample_ms``."""
    _repeat(fn, 1, synchronize)
    began = time.perf_counter()
    _repeat(fn, 3, synchronize)
    per_call_ms = max((time.perf_counter() - began) * 1e3 / 3, 1e-6)
    return int(min(max(math.ceil(min_sample_ms / per_call_ms), 1), limit))


def synchronized_timer(
    synchronize: Callable[[], object] = _noop, *, min_sample_ms: float = 1.0, max_loop: int = 1000
) -> Timer:
    """A :data:`Timer` for asynchronous devices: each sample runs a kernel back to back, then ``synchronize()``.

    The number of calls per sample is set once per kernel so that a sample lasts about
    ``min_sample_ms`` (at most ``max_loop`` calls); kernels are timed in turn by
    :func:`~ohq_lightning._util.timing.time_interleaved`, and each returned
    :class:`~ohq_lightning._util.timing.Timing` is per call (``repeats`` counts samples). With
    ``torch.cuda.synchronize`` this times GPU work including eager launch overheads, as a model
    run eagerly pays them.
    """
    if min_sample_ms <= 0 or max_loop < 1:
        raise ValueError(f"min_sample_ms must be positive and max_loop at least 1, got {min_sample_ms}, {max_loop}")

    def timer(kernels: Sequence[Kernel], settings: TimingSettings) -> list[Timing]:
        loops = [_loop_count(kernel.run, synchronize, min_sample_ms, max_loop) for kernel in kernels]
        fns = [functools.partial(_repeat, k.run, n, synchronize) for k, n in zip(kernels, loops, strict=True)]
        timings = time_interleaved(fns, settings)
        return [Timing(t.median_ms / n, t.spread, t.repeats) for t, n in zip(timings, loops, strict=True)]

    return timer


# ----------------------------------------------------------------------------- target


@dataclass
class _LayerResult:
    best: dict[str, tuple[Timing, str]] = field(default_factory=dict)  # kernel -> (timing, impl)
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)  # kernel -> impl -> why not
    details: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # kernel -> detail of the best impl
    parts: dict[str, float] = field(default_factory=dict)  # quantize / dequantize / casts, ms
    energy: dict[str, float | None] = field(default_factory=dict)  # kernel -> mJ per call
    measured: int = 0
    cached: int = 0


def _default_timing() -> TimingSettings:
    return TimingSettings(warmup=5, min_repeats=10, max_repeats=200, max_seconds=0.5, rel_spread=0.01)


@dataclass(frozen=True)
class CUDATarget:
    """Costs measured on an NVIDIA GPU: each layer's torch kernel timed alone at its real shapes.

    See the module docstring for what is measured and what is approximated.

    Args:
        device: the CUDA device index to measure on.
        options: candidate options (default :data:`CUDA_OPTIONS`: fp32, fp16, bf16, w8a8).
        batch_size: the batch the layers are timed at (default: the example input's batch, else 1).
        timing: how long each layer's kernels are timed.
        min_sample_ms: each timed sample runs a kernel back to back for about this long.
        measure_base: measure the rest of the network (needs the model and its example input).
        energy: read NVML's energy counter for every layer and option (slower: ``energy_seconds``
            each); absent where NVML is not available.
        energy_seconds: how long each energy reading runs the kernel.
        cache_dir: where measurements are cached (default ``$OHQ_CACHE_DIR`` or
            ``~/.cache/ohq_lightning``, under ``oqa/``); ``False`` keeps them in memory only.
        force: measure again even when the cache has the figures.
        progress: show a progress bar over the layers.
        seed: seed of the synthetic inputs and weights.

    Example:
        >>> target = CUDATarget(options=("fp16", "w8a8"))
        >>> plan = search(model, example, target=target, latency_budget=2.0)  # doctest: +SKIP
    """

    name: str = "cuda"
    device: int = 0
    options: tuple[str, ...] = None  # type: ignore[assignment]  # None: the defaults, set in __post_init__
    batch_size: int | None = None
    timing: TimingSettings = field(default_factory=_default_timing)
    min_sample_ms: float = 1.0
    measure_base: bool = True
    energy: bool = False
    energy_seconds: float = 0.2
    cache_dir: str | Path | bool | None = None
    force: bool = False
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.timing, Mapping):  # from a config file
            object.__setattr__(self, "timing", TimingSettings(**self.timing))
        if isinstance(self.device, bool) or not isinstance(self.device, int) or self.device < 0:
            raise ValueError(f"device must be a CUDA device index (an integer >= 0), got {self.device!r}")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer or None, got {self.batch_size!r}")
        if not self.min_sample_ms > 0 or not self.energy_seconds > 0:
            raise ValueError(
                f"min_sample_ms and energy_seconds must be positive, got {self.min_sample_ms}, {self.energy_seconds}"
            )
        if self.options is None:
            names: tuple[str, ...] = CUDA_OPTIONS
            if _plan_knows("fp8"):  # only then look at the GPU (which initialises CUDA)
                capability = _visible_capability(self.device)
                if capability is not None and capability >= FP8_MIN_CAPABILITY:
                    names = (*names, "fp8")
            object.__setattr__(self, "options", names)
            return
        checked = check_options(self.options)  # refusals, duplicates, fp8 while plans cannot name it
        if "fp8" in checked:  # asked for: look at the GPU (which initialises CUDA)
            checked = check_options(checked, _visible_capability(self.device))
        object.__setattr__(self, "options", checked)

    # -- measuring -------------------------------------------------------------------------

    def costs(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        model: Any = None,
        example_inputs: Any = None,
    ) -> CostTable:
        """Measure every layer at every option on the GPU (see the module docstring).

        Raises:
            RuntimeError: ``"no CUDA device: ..."`` when torch sees no CUDA device (or not ``device``).
            ValueError: an option this GPU cannot run (``fp8`` below compute capability 8.9).
        """
        device = self._cuda_device()
        info = DeviceInfo.of(device)
        synchronize = functools.partial(torch.cuda.synchronize, device)
        meter = NvmlEnergyMeter(_nvml_index(device), min_seconds=self.energy_seconds) if self.energy else None
        try:
            with torch.cuda.device(device):
                return self.measure_on(
                    layers,
                    options,
                    device=device,
                    info=info,
                    timer=synchronized_timer(synchronize, min_sample_ms=self.min_sample_ms),
                    synchronize=synchronize,
                    energy_meter=meter,
                    model=model,
                    example_inputs=example_inputs,
                )
        finally:
            if meter is not None:
                meter.close()

    def _cuda_device(self) -> torch.device:
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none'}); the cuda target measures on an NVIDIA GPU: use the 'cpu' or "
                "'analytical' target on this machine"
            )
        count = torch.cuda.device_count()
        if self.device >= count:
            raise RuntimeError(f"no CUDA device: device={self.device} asked for, but torch sees {count}")
        return torch.device("cuda", self.device)

    def _cache(self, info: DeviceInfo, quantity: str = "latency_ms") -> TimingCache:

        root = cache_root(self.cache_dir)
        fingerprint: dict[str, Any] = {
            "method": _METHOD,
            "quantity": quantity,
            "gpu": info.name,
            "capability": f"{info.capability[0]}.{info.capability[1]}",
            "torch": info.torch_version,
            "cuda": info.cuda_version,
            "cudnn": info.cudnn_version,
            "tf32": _tf32_flags(),
            "timing": self.timing.to_dict(),
            "min_sample_ms": self.min_sample_ms,
            "seed": self.seed,
        }
        if quantity != "latency_ms":  # energy entries: Timing.median_ms holds millijoules per call
            fingerprint["energy_seconds"] = self.energy_seconds
        return TimingCache(None if root is None else root / "oqa", fingerprint)

    def _batch(self, example_inputs: Any) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return _example_batch(example_inputs) or 1

    def measure_on(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        device: torch.device | str,
        info: DeviceInfo,
        timer: Timer,
        synchronize: Callable[[], object] = _noop,
        energy_meter: NvmlEnergyMeter | None = None,
        model: Any = None,
        example_inputs: Any = None,
    ) -> CostTable:
        """:meth:`costs` on an explicit device, with an explicit timer, energy meter and device description.

        :meth:`costs` calls it with the GPU, :func:`synchronized_timer` and ``torch.cuda.synchronize``;
        tests call it on the CPU with a scripted timer, which exercises everything but the GPU timing.
        """
        started = time.perf_counter()
        device = torch.device(device)
        names = check_options(self.options if options is None else options, info.capability)
        kernel_of_option = {name: kernel_of(name) for name in names}
        kernels = list(dict.fromkeys(kernel_of_option.values()))
        base_example = _example_batch(example_inputs)
        batch = self._batch(example_inputs)
        base_note: str | None = None
        if not self.measure_base:
            base_note = "not measured (measure_base=False): the rest of the network is not modelled"
        elif model is None or example_inputs is None:
            base_note = "not measured (no model and example input given): the rest of the network is not modelled"
        elif base_example is not None and base_example != batch:
            base_note = (
                f"not measured: the example input's batch ({base_example}) differs from batch_size ({batch}); "
                "the rest of the network is not modelled"
            )
        timed = kernels if base_note is not None or "fp32" in kernels else [*kernels, "fp32"]
        integer = "int8" in kernels
        halves = [kernel for kernel in kernels if kernel in ("fp16", "bf16")] if "fp32" in kernels else []
        cache = self._cache(info)
        energy_on = self.energy and energy_meter is not None and energy_meter.available
        energy_cache = self._cache(info, "energy_mj_per_call") if energy_on else None

        results: dict[str, _LayerResult] = {}
        for layer in progress_bar(layers, desc="OQA: timing layers on the GPU", enabled=self.progress):
            results[layer.name] = self._profile_layer(
                layer,
                timed,
                device=device,
                batch=batch,
                timer=timer,
                synchronize=synchronize,
                cache=cache,
                integer=integer,
                halves=halves,
                energy_meter=energy_meter if energy_on else None,
                energy_cache=energy_cache,
            )
            cache.save()  # an interrupted profile resumes from here
            if energy_cache is not None:
                energy_cache.save()

        base_ms, base_meta = (
            (None, {"note": base_note})
            if base_note is not None
            else self._base(layers, results, model, example_inputs, device, timer)
        )
        table, unsupported = _assemble(layers, names, kernel_of_option, results, integer)
        names_in_order = [layer.name for layer in layers]
        transitions: dict[str, float] = {}
        if integer:
            for here, after in itertools.pairwise(names_in_order):
                transitions[here] = (results[after].parts["quantize"] + results[here].parts["dequantize"]) / 2
        int8 = Option.parse("w8a8")
        return CostTable(
            target=self.name,
            options=list(names),
            costs=table,
            int8_weight_bytes={layer.name: layer.weight_bytes(int8) for layer in layers},
            transition_ms=transitions,
            base_latency_ms=base_ms,
            meta={
                "source": "measured",
                "device": info.to_dict(),
                "tf32": _tf32_flags(),
                "batch_size": batch,
                "kernel_of_option": kernel_of_option,
                "implementations": {
                    name: {kernel: impl for kernel, (_, impl) in result.best.items()}
                    for name, result in results.items()
                },
                "kernel_details": {name: dict(result.details) for name, result in results.items()},
                "unsupported": unsupported,
                "latency_model": "base + sum(isolated layer kernels) + sum(transitions where integer meets float)",
                "layer_latency_is": "median time of the layer's kernel alone (synthetic operands, real shapes), "
                "times its calls per forward",
                "transitions": (
                    "transition_ms[l] = (quantize of the next layer's input + dequantize of l's output) / 2; "
                    "entering int8 at the first layer and leaving it at the last are in their int8 entries"
                    if integer
                    else "none: no integer option"
                ),
                "transition_parts_ms": {
                    name: {part: ms for part, ms in result.parts.items() if part in ("quantize", "dequantize")}
                    for name, result in results.items()
                }
                if integer
                else {},
                "float_casts": "not charged: half layers are timed with half operands; casts measured per layer in "
                "float_cast_ms (input fp32 -> half + output half -> fp32)",
                "float_cast_ms": {
                    name: {half: result.parts[f"cast_in:{half}"] + result.parts[f"cast_out:{half}"] for half in halves}
                    for name, result in results.items()
                }
                if halves
                else {},
                "base": base_meta,
                "energy": _energy_note(self.energy, energy_meter, self.energy_seconds),
                "fp8": "transitions are not charged for fp8 (float in, float out: the input cast is in its entry)"
                if "fp8" in kernels
                else "not among the options",
                "timing": self.timing.to_dict(),
                "min_sample_ms": self.min_sample_ms,
                "measured_now": sum(result.measured for result in results.values()),
                "from_cache": sum(result.cached for result in results.values()),
                "profile_s": time.perf_counter() - started,
                "cache_file": None if cache.path is None else str(cache.path),
            },
        )

    def _profile_layer(
        self,
        layer: LayerInfo,
        kernels: Sequence[str],
        *,
        device: torch.device,
        batch: int,
        timer: Timer,
        synchronize: Callable[[], object],
        cache: TimingCache,
        integer: bool,
        halves: Sequence[str],
        energy_meter: NvmlEnergyMeter | None,
        energy_cache: TimingCache | None,
    ) -> _LayerResult:
        """Time one layer's kernels (and its transitions), reading what the cache has."""
        result = _LayerResult()
        keys: dict[tuple[str, str], str] = {}
        pending: dict[tuple[str, str], _Builder] = {}
        for kernel in kernels:
            builders, reasons = implementations(layer, kernel)
            result.reasons[kernel] = dict(reasons)
            for impl, builder in builders.items():
                keys[kernel, impl] = _layer_key(layer, batch, kernel, impl)
                pending[kernel, impl] = builder
        ops: _Operands | None = None
        built: dict[tuple[str, str], Kernel] = {}

        def build(kernel: str, impl: str) -> Kernel | None:
            nonlocal ops
            if (kernel, impl) not in built:
                if ops is None:
                    ops = _operands(layer, device, batch, self.seed)
                probed = _probe(ops, kernel, impl, pending[kernel, impl], keys[kernel, impl], synchronize)
                if isinstance(probed, str):
                    result.reasons[kernel][impl] = probed
                    return None
                built[kernel, impl] = probed
            return built[kernel, impl]

        timings: dict[str, Timing] = {}
        todo: list[Kernel] = []
        for (kernel, impl), key in keys.items():
            cached = None if self.force else cache.get(key)
            if cached is not None:
                timings[key] = cached
                result.cached += 1
            elif (made := build(kernel, impl)) is not None:
                todo.append(made)
        extras = transition_kernels(layer, device=device, batch=batch, seed=self.seed, integer=integer, halves=halves)
        for extra in extras:
            cached = None if self.force else cache.get(extra.key)
            if cached is not None:
                timings[extra.key] = cached
            else:
                todo.append(extra)
        if todo:
            for made, timing in zip(todo, timer(todo, self.timing), strict=True):
                cache.put(made.key, timing)
                timings[made.key] = timing
            result.measured += sum(1 for made in todo if (made.name, made.impl) in keys)
        for extra in extras:
            result.parts[extra.name] = timings[extra.key].median_ms
        for (kernel, impl), key in keys.items():
            timing = timings.get(key)
            if timing is not None and (
                kernel not in result.best or timing.median_ms < result.best[kernel][0].median_ms
            ):
                result.best[kernel] = (timing, impl)
        for kernel, (_, impl) in result.best.items():
            made = built.get((kernel, impl))
            result.details[kernel] = {"impl": impl, **(made.detail if made is not None else {"from_cache": True})}
            if energy_meter is not None and energy_cache is not None:
                result.energy[kernel] = _energy_of(
                    keys[kernel, impl],
                    lambda k=kernel, i=impl: build(k, i),
                    self.force,
                    energy_meter,
                    energy_cache,
                    synchronize,
                )
        return result

    def _base(
        self,
        layers: Sequence[LayerInfo],
        results: Mapping[str, _LayerResult],
        model: Any,
        example_inputs: Any,
        device: torch.device,
        timer: Timer,
    ) -> tuple[float | None, dict[str, Any]]:
        """The rest of the network: the whole fp32 forward on the device minus its layers' fp32 entries."""
        missing = [layer.name for layer in layers if "fp32" not in results[layer.name].best]
        if missing:
            return None, {"note": f"not measured: layers {missing} have no fp32 timing"}
        try:
            network = _network_kernel(model, example_inputs, device)
        except Exception as failure:  # a model that cannot be copied or moved to the device
            return None, {"note": f"not measured: the model does not run on {device}: {_short(failure)}"}
        whole = timer([network], self.timing)[0].median_ms
        layer_sum = sum(results[layer.name].best["fp32"][0].median_ms * layer.calls for layer in layers)
        meta = {"network_fp32_ms": whole, "layers_fp32_ms": layer_sum}
        if whole - layer_sum < 0:
            meta["note"] = (
                "not used: the layers timed alone take longer than the whole network, so the rest of the network "
                "cannot be told apart; it is not modelled"
            )
            return None, meta
        meta["note"] = (
            "measured: the whole network's eager fp32 forward minus its layers' fp32 entries; at other precisions "
            "the rest of the network is assumed to cost the same"
        )
        return whole - layer_sum, meta


def _example_batch(example_inputs: Any) -> int | None:
    if example_inputs is None:
        return None
    from ohq_lightning.layers import first_tensor

    tensor = first_tensor(list(example_inputs.values()) if isinstance(example_inputs, dict) else example_inputs)
    if tensor is None or tensor.dim() == 0:
        return None
    return int(tensor.shape[0])


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def _network_kernel(model: Any, example_inputs: Any, device: torch.device) -> Kernel:
    """The whole model's eager fp32 forward on ``device`` (a copy: the caller's model is not moved)."""
    import copy

    from ohq_lightning.layers import run_model

    network = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval()
    inputs = _to_device(example_inputs, device)

    def run() -> Any:
        with torch.no_grad():
            return run_model(network, inputs)

    run()
    return Kernel("network", "model.forward (eager, fp32)", "", run)


def _energy_of(
    key: str,
    build: Callable[[], Kernel | None],
    force: bool,
    meter: NvmlEnergyMeter,
    cache: TimingCache,
    synchronize: Callable[[], object],
) -> float | None:
    cached = None if force else cache.get(key)
    if cached is not None:
        return cached.median_ms  # millijoules per call, in the energy cache
    made = build()
    if made is None:
        return None
    value = meter.measure_mj(made.run, synchronize=synchronize)
    if value is not None:
        cache.put(key, Timing(value, 0.0, 1))
    return value


def _energy_note(wanted: bool, meter: NvmlEnergyMeter | None, seconds: float) -> str:
    if not wanted:
        return "not measured (energy=False; energy=True reads NVML's energy counter where the GPU has one)"
    if meter is None or not meter.available:
        reason = "no energy meter" if meter is None else meter.reason
        return f"not measured: {reason}"
    return (
        f"measured: NVML total-energy counter around each layer's kernel run back to back for >= {seconds} s; "
        "board energy per call, static power included; transitions carry no energy"
    )


def _assemble(
    layers: Sequence[LayerInfo],
    names: Sequence[str],
    kernel_of_option: Mapping[str, str],
    results: Mapping[str, _LayerResult],
    integer: bool,
) -> tuple[dict[str, dict[str, LayerCost]], dict[str, dict[str, str]]]:
    """Cost entries from the measurements; options a layer has no kernel for are ``unsupported``."""
    table: dict[str, dict[str, LayerCost]] = {}
    unsupported: dict[str, dict[str, str]] = {}
    last = len(layers) - 1
    for index, layer in enumerate(layers):
        result = results[layer.name]
        row: dict[str, LayerCost] = {}
        for name in names:
            option = Option.parse(name)
            kernel = kernel_of_option[name]
            best = result.best.get(kernel)
            if best is None:
                reasons = result.reasons.get(kernel, {}).items()
                why = "; ".join(reason if impl == "*" else f"{impl}: {reason}" for impl, reason in reasons)
                unsupported.setdefault(layer.name, {})[name] = why or "no implementation"
                row[name] = LayerCost(layer.weight_bytes(option), layer.bops(option), None, None, UNSUPPORTED)
                continue
            latency = best[0].median_ms * layer.calls
            if integer and kernel == "int8":
                latency += result.parts["quantize"] if index == 0 else 0.0
                latency += result.parts["dequantize"] if index == last else 0.0
            energy = result.energy.get(kernel)
            row[name] = LayerCost(
                weight_bytes=layer.weight_bytes(option),
                bops=layer.bops(option),
                latency_ms=latency,
                energy_mj=None if energy is None else energy * layer.calls,
                source="measured",
            )
        table[layer.name] = row
    return table, unsupported
