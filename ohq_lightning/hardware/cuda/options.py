"""The precisions the cuda target offers, the kernel each runs on, and the GPU a measurement belongs to.

An option runs on one of :data:`KERNELS`: ``fp32``/``fp16``/``bf16`` on torch's float kernels,
every integer option with 8-bit activations on the int8 kernel (``w4a8``'s weights sit on a
coarser grid inside int8) and ``fp8`` on ``torch._scaled_mm`` (compute capability 8.9+, and only
once the plan format can name it). :class:`DeviceInfo` and :func:`tf32_flags` describe what a
measurement depends on besides the layer, so that a cache never mixes GPUs or software versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ohq_lightning._util.jsonable import JsonMixin
from ohq_lightning.plan import Option

__all__ = [
    "CUDA_OPTIONS",
    "FP8_MIN_CAPABILITY",
    "KERNELS",
    "DeviceInfo",
    "check_options",
    "kernel_of",
    "nvml_index",
    "plan_can_name",
    "tf32_flags",
    "visible_capability",
]

#: The options the cuda target offers by default (``fp8`` joins them on sm_89+ once plans can name it).
CUDA_OPTIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "w8a8")
#: ``torch._scaled_mm`` (fp8) needs compute capability 8.9 (Ada) or newer.
FP8_MIN_CAPABILITY: tuple[int, int] = (8, 9)
#: The kernels options run on.
KERNELS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "fp8")


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


def plan_can_name(name: str) -> bool:
    """Whether the plan format (:class:`~ohq_lightning.plan.Option`) can name option ``name``."""
    try:
        Option.parse(name)
    except ValueError:
        return False
    return True


def _checked_fp8(capability: tuple[int, int] | None) -> str:
    """``"fp8"`` when this GPU and the plan format allow it, else a ValueError saying which does not."""
    if capability is not None and tuple(capability) < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"option 'fp8' needs a GPU of compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} "
            f"or newer (Ada, Hopper, Blackwell): torch._scaled_mm has no fp8 kernel for sm_"
            f"{capability[0]}{capability[1]}"
        )
    if not plan_can_name("fp8"):
        raise ValueError(
            "option 'fp8' cannot be planned yet: the plan format (ohq_lightning.plan.Option) has no 8-bit "
            "float option, so no plan, sensitivity or fake-quant stage could name it; the cuda target can "
            "time fp8 (torch._scaled_mm) once it does"
        )
    return "fp8"


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
        canonical = _checked_fp8(capability) if kernel_of(name) == "fp8" else Option.parse(name).name
        if canonical in checked:
            raise ValueError(f"option {canonical!r} is listed twice")
        checked.append(canonical)
    return tuple(checked)


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


def tf32_flags() -> dict[str, bool]:
    """torch's TF32 switches, which decide what an fp32 convolution or matmul computes with."""
    return {
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }


def visible_capability(index: int) -> tuple[int, int] | None:
    """The compute capability of CUDA device ``index``, or None without one (initialises CUDA)."""
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def nvml_index(device: torch.device) -> int:
    """The NVML index of a CUDA device (honours CUDA_VISIBLE_DEVICES where torch can map it)."""
    try:
        return int(torch.cuda._get_nvml_device_index(device))
    except Exception:  # private helper: absent in some versions, or UUID mapping without NVML
        return int(device.index or 0)
