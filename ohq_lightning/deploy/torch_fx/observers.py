"""Range recording on the float graph, and the light observers the int8 conversion reads its grids from."""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["RangeRecorder", "observer_classes"]


class RangeRecorder(torch.fx.Interpreter):
    """Runs a float graph and records the min/max of every tensor it computes, and its size per sample,
    by node name (ranges accumulate over runs)."""

    def __init__(
        self, module: torch.fx.GraphModule, ranges: dict[str, tuple[float, float]], sizes: dict[str, int]
    ) -> None:
        super().__init__(module)
        self.ranges = ranges
        self.sizes = sizes

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor) and result.is_floating_point() and result.numel():
            self.sizes[n.name] = result.numel() // max(result.shape[0], 1) if result.dim() else 1
            low, high = float(result.min()), float(result.max())
            if n.name in self.ranges:
                old = self.ranges[n.name]
                low, high = min(low, old[0]), max(high, old[1])
            self.ranges[n.name] = (low, high)
        return result


@functools.cache
def observer_classes() -> tuple[type, type]:
    """Two light observers (torch's own build many buffers per instance, and FX makes hundreds per plan).

    ``RangeObserver``: per-tensor uint8 activations from a range set directly (``min_val``/``max_val``),
    computed like torch's ``MinMaxObserver`` (the grid covers ``[min(low, 0), max(high, 0)]``).
    ``StepObserver``: per-channel symmetric int8 weights with given step sizes and zero point 0.
    """
    # deferred: torch.ao.quantization is deprecated upstream; only the torch runtime loads it
    from torch.ao.quantization.observer import ObserverBase

    class RangeObserver(ObserverBase):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(dtype=torch.quint8)
            self.qscheme = torch.per_tensor_affine
            self.quant_min, self.quant_max = 0, 255
            self.min_val, self.max_val = float("inf"), float("-inf")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.numel():
                self.min_val = min(self.min_val, float(x.min()))
                self.max_val = max(self.max_val, float(x.max()))
            return x

        def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            low, high = min(self.min_val, 0.0), max(self.max_val, 0.0)
            scale = max((high - low) / 255.0, float(torch.finfo(torch.float32).eps))
            zero_point = int(min(max(round(-low / scale), 0), 255))
            return torch.tensor([scale], dtype=torch.float32), torch.tensor([zero_point], dtype=torch.int32)

    class StepObserver(ObserverBase):
        def __init__(self, step: torch.Tensor | None = None, **kwargs: Any) -> None:
            super().__init__(dtype=torch.qint8)
            self.qscheme = torch.per_channel_symmetric
            self.ch_axis = 0
            self.quant_min, self.quant_max = -128, 127
            self.step = torch.ones(1) if step is None else step

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            return self.step.clone(), torch.zeros(self.step.numel(), dtype=torch.int64)

    return RangeObserver, StepObserver
