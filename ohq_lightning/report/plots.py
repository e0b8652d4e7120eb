"""Pictures of a plan and of its results (PNG, via matplotlib's non-interactive Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ohq_lightning.plan import Option, QuantPlan

__all__ = ["pareto_front", "plot_accuracy_latency", "plot_pareto", "plot_plan"]

_FLOAT_COLOR = "#7f7f7f"
_BIT_COLORS = {8: "#1f77b4", 6: "#17becf", 5: "#2ca02c", 4: "#ff7f0e", 3: "#d62728", 2: "#9467bd"}


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend.

    matplotlib is imported here, not at the top: it is a heavy optional dependency that only the
    pictures need, so importing :mod:`ohq_lightning` (or its tables) does not pay for it.
    """
    import matplotlib  # deferred: heavy optional dependency (see above)

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _option_color(name: str) -> str:
    option = Option.parse(name)
    if option.is_float:
        return _FLOAT_COLOR if option.float_format == "fp32" else "#bcbd22"
    return _BIT_COLORS.get(option.weight_bits or 8, "#8c564b")


def _option_order(name: str) -> tuple[bool, int, str]:
    """Float options first, then integer options from most to fewest weight bits."""
    option = Option.parse(name)
    return (not option.is_float, -(option.weight_bits or 0), name)


def plot_plan(plan: QuantPlan, path: str | Path, *, title: str | None = None) -> Path:
    """One bar per layer, in forward order: height = the layer's MACs (log scale), colour = its option.

    A second panel shows the MQE sensitivity of the option chosen, so the picture answers "which
    layers got few bits, and what did it cost".
    """
    plt = _pyplot()
    rows = plan.layers or [{"name": name, "option": option} for name, option in plan.assignment.items()]
    names = [row["name"] for row in rows]
    options = [row["option"] for row in rows]
    macs = [max(float(row.get("macs") or 1.0), 1.0) for row in rows]
    scores = [max(float(row.get("sensitivity") or 0.0), 1e-12) for row in rows]
    colors = [_option_color(option) for option in options]
    width = min(max(6.0, 0.18 * len(rows) + 2.0), 24.0)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(width, 6.0), sharex=True, height_ratios=[3, 2])
    positions = range(len(rows))
    top.bar(positions, macs, color=colors)
    top.set_yscale("log")
    top.set_ylabel("MACs")
    bottom.bar(positions, scores, color=colors)
    bottom.set_yscale("log")
    bottom.set_ylabel("MQE sensitivity (KL)")
    bottom.set_xticks(list(positions))
    bottom.set_xticklabels(names, rotation=90, fontsize=6)
    legend = sorted(set(options), key=_option_order)
    handles = [plt.Rectangle((0, 0), 1, 1, color=_option_color(option)) for option in legend]
    top.legend(handles, legend, title="option", fontsize=8, loc="upper right")
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(plan.option_counts().items()))
    top.set_title(title or f"OHQ plan ({counts})")
    figure.tight_layout()
    return _save(figure, path)


def plot_accuracy_latency(
    points: Mapping[str, Mapping[str, Any]], path: str | Path, *, title: str = "accuracy vs measured latency"
) -> Path:
    """Scatter of ``{"label": {"latency_ms": ..., "accuracy": ...}}``: one labelled point per model."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.0, 4.5))
    for label, point in points.items():
        axes.scatter(point["latency_ms"], 100 * point["accuracy"], s=60)
        axes.annotate(label, (point["latency_ms"], 100 * point["accuracy"]), textcoords="offset points", xytext=(6, 4))
    axes.set_xlabel("measured latency (ms, median)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_pareto(
    runs: Sequence[Mapping[str, Any]],
    baselines: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    *,
    x: str = "latency_ms",
    title: str = "OHQ sweep",
) -> Path:
    """Accuracy against ``x`` (``latency_ms`` or ``size_bytes``) for each run of a sweep, with the baselines.

    ``runs`` are dicts with ``label``, ``accuracy`` and ``x``; the Pareto front (no run both faster
    or smaller and more accurate) is drawn as a line.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    scale = 1e-6 if x == "size_bytes" else 1.0
    front = pareto_front([(run[x], run["accuracy"]) for run in runs])
    for run in runs:
        on_front = (run[x], run["accuracy"]) in front
        axes.scatter(run[x] * scale, 100 * run["accuracy"], s=55, color="#ff7f0e" if on_front else "#ffbb78")
        axes.annotate(str(run["label"]), (run[x] * scale, 100 * run["accuracy"]), fontsize=7, xytext=(5, 3),
                      textcoords="offset points")  # fmt: skip
    if front:
        axes.plot([p[0] * scale for p in front], [100 * p[1] for p in front], color="#ff7f0e", lw=1, label="OHQ front")
    for label, point in baselines.items():
        axes.scatter(point[x] * scale, 100 * point["accuracy"], marker="s", s=60, label=label)
    axes.set_xlabel("model size (MB)" if x == "size_bytes" else "measured latency (ms, median)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and accuracy (higher), by increasing cost.

    Example:
        >>> pareto_front([(1.0, 0.9), (2.0, 0.8), (3.0, 0.95)])
        [(1.0, 0.9), (3.0, 0.95)]
    """
    front: list[tuple[float, float]] = []
    for cost, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((cost, accuracy))
    return front


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    import matplotlib.pyplot as plt  # deferred: heavy optional dependency (see _pyplot)

    plt.close(figure)
    return path
