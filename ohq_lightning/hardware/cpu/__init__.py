"""The measured CPU target: each layer's cost on this device, in context, in the runtime that will deploy it.

The target deploys the real network with sets of layers on integer kernels (ONNX Runtime QDQ graphs,
or torch's FX int8 kernels), times each deployment alternately with the all-FP32 one, and fits an
additive model to those timings by least squares::

    latency(plan) = base + sum(kappa[l] for integer layers l) + sum(T[i] for boundaries i that change precision)

``base`` becomes the cost table's ``base_latency_ms``, ``kappa`` the latency of a layer's integer
options (a delta against FP32, whose entry is 0), ``T >= 0`` its ``transition_ms``. Sub-8-bit weight
options run on the 8-bit kernel; energy is not measured.

Method, and the measurements behind each choice: ``docs/notes/cpu_target.md``.

Modules: :mod:`.target` (:class:`CPUTarget`), :mod:`.fit` (the additive model and its outliers),
``_runtimes`` (how each runtime turns a set of integer layers into a runnable graph), ``_profile``
(timing mixes and caching them).
"""

from ohq_lightning.hardware.cpu._runtimes import RUNTIMES
from ohq_lightning.hardware.cpu.target import CPU_OPTIONS, DEFAULT_TIMING, CPUTarget

__all__ = ["CPU_OPTIONS", "DEFAULT_TIMING", "RUNTIMES", "CPUTarget"]
