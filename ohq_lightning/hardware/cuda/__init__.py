"""The measured CUDA target: each layer's real GPU kernel, timed alone at the layer's real shapes.

One idea per module: :mod:`.options` (the precisions offered, the kernel each runs on, the GPU a
measurement belongs to), :mod:`.timer` (timing asynchronous kernels), :mod:`.kernels` (each layer's
torch kernel per precision, checked before it is timed), :mod:`.transitions` (quantize, dequantize
and half casts between layers), :mod:`.energy` (NVML glue), :mod:`.profiling` (one layer, cached),
:mod:`.network` (the rest of the network), :mod:`.table` (the cost table) and :mod:`.target`
(:class:`CUDATarget`, which calls them). What is measured and what is approximated: docs/notes/cuda.md.
"""

from __future__ import annotations

from ohq_lightning.hardware.cuda.kernels import implementations, layer_kernels
from ohq_lightning.hardware.cuda.options import (
    CUDA_OPTIONS,
    FP8_MIN_CAPABILITY,
    KERNELS,
    DeviceInfo,
    check_options,
    kernel_of,
)
from ohq_lightning.hardware.cuda.target import CUDATarget
from ohq_lightning.hardware.cuda.timer import Kernel, Timer, synchronized_timer
from ohq_lightning.hardware.cuda.transitions import transition_kernels

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
