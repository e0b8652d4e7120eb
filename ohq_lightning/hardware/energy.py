"""GPU energy from NVIDIA's NVML counter, where the device and driver expose it.

NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``: millijoules since the driver
loaded, Volta and newer) is read before and after running an operation back to back; the
difference over the number of calls is the energy of one call. It is the whole board's energy,
static power included, over the time the calls took: a device-level figure, not the kernel's
dynamic energy alone. The counter updates coarsely (tens of milliseconds), so each measurement
runs for at least ``min_seconds``.

Where NVML's Python bindings (the ``nvidia-ml-py`` package, imported as ``pynvml``) are missing,
the counter is unsupported (older GPUs, MIG slices, some virtual machines) or unreadable,
:class:`NvmlEnergyMeter` says so in ``reason`` and measures nothing: energy is then absent,
never estimated. The CPU's counterpart is :class:`~ohq_lightning._util.timing.RaplEnergyMeter`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

__all__ = ["NvmlEnergyMeter"]


def _noop() -> None:
    return None


class NvmlEnergyMeter:
    """Energy per call of an operation on one NVIDIA GPU, from NVML's total-energy counter.

    Args:
        index: the GPU's NVML index (not necessarily its CUDA index: see
            ``torch.cuda._get_nvml_device_index``, which honours ``CUDA_VISIBLE_DEVICES``).
        nvml: the NVML module to use (default: ``import pynvml``, from the ``nvidia-ml-py`` package).
        min_seconds: how long each measurement runs at least (the counter updates coarsely).

    ``available`` is False, with the reason in ``reason``, when the counter cannot be read.

    Example:
        >>> meter = NvmlEnergyMeter(0)
        >>> meter.available or bool(meter.reason)
        True
        >>> meter.close()
    """

    def __init__(self, index: int = 0, *, nvml: Any = None, min_seconds: float = 0.2) -> None:
        if min_seconds <= 0:
            raise ValueError(f"min_seconds must be positive, got {min_seconds}")
        self.index = index
        self.min_seconds = float(min_seconds)
        self.available = False
        self.reason: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        if nvml is None:
            try:
                import pynvml as nvml  # the nvidia-ml-py package
            except ImportError:
                self.reason = "NVML's Python bindings are not installed (pip install nvidia-ml-py)"
                return
        try:
            nvml.nvmlInit()
        except Exception as error:  # NVMLError and friends: no driver, no library
            self.reason = f"NVML did not initialise: {type(error).__name__}: {error}"
            return
        self._nvml = nvml
        try:
            self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
            int(nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception as error:  # NVML_ERROR_NOT_SUPPORTED on pre-Volta GPUs, MIG slices, some VMs
            self.reason = f"NVML's energy counter is not readable on GPU {index}: {type(error).__name__}: {error}"
            self.close()
            return
        self.available = True

    def read_mj(self) -> int:
        """The counter: millijoules since the driver loaded."""
        if not self.available:
            raise RuntimeError(f"no NVML energy counter: {self.reason}")
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def measure_mj(
        self, fn: Callable[[], object], *, synchronize: Callable[[], object] = _noop, chunk: int = 10
    ) -> float | None:
        """Millijoules per call of ``fn``, or None where the counter is unavailable or did not move.

        ``fn`` runs back to back in chunks of ``chunk`` calls, each chunk followed by
        ``synchronize()`` (``torch.cuda.synchronize`` for GPU work, whose calls return before the
        GPU finishes), until ``min_seconds`` have passed and the counter has moved (at most ten
        times ``min_seconds``).
        """
        if not self.available:
            return None
        fn()
        synchronize()
        start = self.read_mj()
        began = time.perf_counter()
        calls = 0
        while True:
            for _ in range(chunk):
                fn()
            synchronize()
            calls += chunk
            elapsed = time.perf_counter() - began
            if elapsed < self.min_seconds:
                continue
            used = self.read_mj() - start
            if used > 0 or elapsed >= 10 * self.min_seconds:
                break
        return used / calls if used > 0 else None

    def close(self) -> None:
        """Release NVML (safe to call twice)."""
        if self._nvml is not None:
            with contextlib.suppress(Exception):  # after a driver error there is nothing left to release
                self._nvml.nvmlShutdown()
            self._nvml = None
        if self.available:
            self.reason = "the meter was closed"
        self.available = False
        self._handle = None

    def __enter__(self) -> NvmlEnergyMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
