"""A layer's folded weight put on its ``b``-bit grid inside int8, with learned or MSE-optimal step sizes.

A ``w{b}`` option with b < 8 stores its weights on its b-bit grid inside int8: the folded weight is
rounded to ``[-2^(b-1), 2^(b-1)-1]`` steps before torch quantizes it with exactly those steps (a plain
observer with a narrow ``quant_min``/``quant_max`` would not do: torch clamps to the int8 range only,
so the largest weight could land one step outside the grid). A channel whose folded BatchNorm scale
is negative stores the mirrored grid ``[-(2^(b-1)-1), 2^(b-1)]``: the same 2^b levels, the same values
as the fake-quant model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ohq_lightning.deploy.learned import learned_weight_scale
from ohq_lightning.quant.export import LearnedQuantization
from ohq_lightning.quant.fake_quant import int_range, mse_scale

__all__ = ["LayerWeight"]


@dataclass
class LayerWeight:
    """One layer's weights in the fused graph, and its snapped copies by bits (computed once each)."""

    float_weight: torch.Tensor  # BatchNorm folded
    original: torch.Tensor  # the weight before BatchNorm folding, flattened per output channel
    learned: LearnedQuantization | None
    snapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def on_grid(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded weight on its ``bits``-bit grid, and its per-channel step sizes."""
        if bits not in self.snapped:
            weight = self.float_weight
            flat = weight.reshape(weight.shape[0], -1)
            qmin, qmax = int_range(bits, signed=True)
            step = learned_weight_scale(self.learned, bits)
            if step is not None:
                # Fake quant rounds the conv weight w before BatchNorm; folding multiplies each
                # channel by k: the same grid, with step |k| * s, mirrored where k < 0.
                original = self.original
                norm = (original * original).sum(dim=1)
                factor = torch.where(norm > 0, (flat * original).sum(dim=1) / norm.clamp_min(1e-30), 0.0)
                step = step.to(weight.dtype)
                integers = torch.clamp(torch.round(original / step[:, None]), qmin, qmax) * torch.sign(factor)[:, None]
                scale = step * factor.abs()
            else:
                scale = mse_scale(weight, bits, signed=True, dim=0).reshape(-1)
                integers = torch.clamp(torch.round(flat / scale[:, None]), qmin, qmax)
            alive = scale > 0
            scale = torch.where(alive, scale, torch.ones_like(scale))
            integers = torch.where(alive[:, None], integers, torch.zeros_like(integers)).clamp(-128, 127)
            self.snapped[bits] = ((integers * scale[:, None]).reshape(weight.shape), scale.float())
        return self.snapped[bits]
