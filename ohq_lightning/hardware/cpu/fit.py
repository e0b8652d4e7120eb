"""The CPU target's latency model, fitted to measured mixes by least squares.

``latency(plan) = base + sum(kappa[l] for integer layers l) + sum(T[i] for boundaries i that change precision)``
with ``T >= 0``. A plan is written as a bit string over the layers in forward order (``"1"``: the
layer runs on integer kernels), and a boundary is a pair of consecutive layers. Why this model and
not isolated layer timings: ``docs/notes/cpu_target.md``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import lsq_linear

__all__ = ["RETIME_FACTOR", "RETIME_FLOOR", "AdditiveFit", "design_row", "fit_additive", "outliers"]

RETIME_FACTOR, RETIME_FLOOR = 3.0, 0.05
"""A sample the fit misses by more than ``max(RETIME_FACTOR x the median miss, RETIME_FLOOR)`` is an outlier."""


@dataclass(frozen=True)
class AdditiveFit:
    """The fitted model: ``base`` (ms), per-layer integer deltas ``kappa``, per-boundary ``transitions``.

    ``stats`` holds the fit's quality (residuals, hold-out error) and the all-FP32 / all-INT8 latencies.
    """

    base: float
    kappa: np.ndarray
    transitions: np.ndarray
    stats: dict[str, Any]

    def predict(self, bits: str) -> float:
        """Predicted latency (ms) of the plan ``bits``."""
        return float(design_row(bits) @ np.concatenate([[self.base], self.kappa, self.transitions]))


def design_row(bits: str) -> np.ndarray:
    """The plan's row of the least-squares system: 1 (base), the integer layers, the precision changes."""
    x = np.array([c == "1" for c in bits], dtype=float)
    return np.concatenate([[1.0], x, np.abs(np.diff(x))])


def _solve(rows: np.ndarray, targets: np.ndarray, count: int, weights: np.ndarray) -> np.ndarray:
    lower = np.concatenate([np.full(1 + count, -np.inf), np.zeros(max(count - 1, 0))])
    scaled = rows * weights[:, None]
    return lsq_linear(scaled, targets * weights, bounds=(lower, np.full(rows.shape[1], np.inf))).x


def _weights(keys: list[str], count: int) -> np.ndarray:
    """Least-squares weights: the uniform plans (all-FP32, all-INT8) count as a quarter of all samples each.

    They are the builds every plan is compared with (the default sensitivity bound, the uniform guard,
    the report), and the corners of the design, where an additive model fitted to random mixes alone
    missed the measured all-INT8 graph by 6-9% on MobileNetV3-large while its median miss was 1%.
    """
    corner = max(len(keys) / 4, 1.0) ** 0.5
    return np.array([corner if bits in ("0" * count, "1" * count) else 1.0 for bits in keys])


def fit_additive(measured: Mapping[str, float], count: int, seed: int) -> AdditiveFit:
    """Least-squares fit of base, per-layer integer deltas and transition costs (``T >= 0``) to the samples.

    ``measured`` maps plans over ``count`` layers to latencies (ms) and must hold the all-FP32 and
    all-INT8 plans, which weigh more than the mixes (see :func:`_weights`); a fifth of the samples
    (chosen with ``seed``) is held out once to estimate the error on unseen plans.
    """
    keys = list(measured)
    rows = np.stack([design_row(bits) for bits in keys])
    targets = np.array([measured[bits] for bits in keys])
    weights = _weights(keys, count)
    solution = _solve(rows, targets, count, weights)
    predicted = rows @ solution
    relative = np.abs(predicted - targets) / targets
    rng = np.random.default_rng(seed + 1)
    held = rng.permutation(len(keys))[: max(len(keys) // 5, 1)]
    kept = np.setdiff1d(np.arange(len(keys)), held)
    holdout = rows[held] @ _solve(rows[kept], targets[kept], count, weights[kept])
    stats = {
        "samples": len(keys),
        "unknowns": int(rows.shape[1]),
        "max_rel_residual": float(relative.max()),
        "median_rel_residual": float(np.median(relative)),
        "holdout_max_rel_error": float((np.abs(holdout - targets[held]) / targets[held]).max()),
        "fp32_ms": measured["0" * count],
        "int8_ms": measured["1" * count],
    }
    return AdditiveFit(float(solution[0]), solution[1 : 1 + count], solution[1 + count :], stats)


def outliers(measured: Mapping[str, float], fit: AdditiveFit, *, candidates: set[str]) -> list[str]:
    """The candidate samples ``fit`` misses by more than ``max(3 x its median miss, 5%)``, worst first."""
    miss = {bits: abs(fit.predict(bits) - value) / value for bits, value in measured.items()}
    limit = max(RETIME_FACTOR * statistics.median(miss.values()), RETIME_FLOOR)
    return sorted((bits for bits in candidates if miss[bits] > limit), key=lambda bits: -miss[bits])
