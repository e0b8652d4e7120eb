"""One summary over the runs of a sweep: a table and a Pareto plot across every run's ``report.json``.

Written at the end of a Hydra multirun (``python -m ohq_lightning -m ...``, through the
:class:`SweepSummary` callback in ``conf/config.yaml``), or afterwards, e.g. for runs collected
from a cluster::

    python -m ohq_lightning.sweep multirun/resnet18/2026-11-30_10-00-00

That command runs :func:`main` through the module :mod:`ohq_lightning.sweep` (this package's
``__init__`` imports this module, so running it here with ``-m`` would make ``runpy`` warn).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback

from ohq_lightning.report.plots import plot_pareto
from ohq_lightning.report.tables import format_table

__all__ = ["SweepSummary", "collect_reports", "main", "summarize"]

_VARIED = ("compression_ratio", "latency_budget", "energy_budget", "bops_budget", "sensitivity_budget")


def collect_reports(directory: str | Path) -> list[dict[str, Any]]:
    """Every ``report.json`` under ``directory`` (recursively), each with its ``path``, in path order."""
    reports = []
    for path in sorted(Path(directory).rglob("report.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            print(f"skipping {path}: not a readable report ({error})", file=sys.stderr)
            continue
        if all(key in report for key in ("fp32", "int8", "ohq")):
            report["path"] = str(path.parent)
            reports.append(report)
    return reports


def _label(report: dict[str, Any]) -> str:
    objective = report.get("objective") or {}
    parts = [f"{key}={objective[key]}" for key in _VARIED if key in objective]
    return ", ".join(parts) or Path(report["path"]).name


def summarize(directory: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Write ``sweep.json``, ``sweep.md`` and (``plots``) ``pareto.png``/``pareto_size.png`` into ``directory``.

    Returns the summary (what ``sweep.json`` holds). Raises ``ValueError`` when no report is found.
    """
    root = Path(directory)
    reports = collect_reports(root)
    if not reports:
        raise ValueError(f"no report.json with fp32/int8/ohq entries under {root}")
    runs = [
        {
            "label": _label(report),
            "path": report["path"],
            "model": report.get("model"),
            "accuracy": report["ohq"]["accuracy"],
            "size_bytes": report["ohq"]["size_bytes"],
            "latency_ms": report["ohq"]["latency_ms"],
            "predicted_latency_ms": report["ohq"].get("predicted_latency_ms"),
            "ohq_over_int8": report["ratios"]["ohq_over_int8"],
            "option_counts": report["plan"]["option_counts"],
        }
        for report in reports
    ]
    # Baselines are measured in every run: their medians across runs are the fairest single figure.
    baselines = {}
    for key, label in (("fp32", "FP32"), ("int8", "uniform INT8")):
        entries = [report[key] for report in reports]
        baselines[label] = {
            metric: sorted(entry[metric] for entry in entries)[len(entries) // 2]
            for metric in ("accuracy", "size_bytes", "latency_ms")
        }
    summary = {"directory": str(root), "runs": runs, "baselines": baselines}
    (root / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    headers = ["run", "accuracy %", "size MB", "measured ms", "predicted ms", "x INT8 time", "options"]
    rows = [
        [
            run["label"],
            100 * run["accuracy"],
            run["size_bytes"] / 1e6,
            run["latency_ms"],
            run["predicted_latency_ms"],
            run["ohq_over_int8"],
            ", ".join(f"{k}: {v}" for k, v in sorted(run["option_counts"].items())),
        ]
        for run in runs
    ]
    rows += [[label, 100 * b["accuracy"], b["size_bytes"] / 1e6, b["latency_ms"], None, None, ""] for label, b in
             baselines.items()]  # fmt: skip
    lines = [f"# OHQ sweep: {len(runs)} runs in {root}", "", format_table(headers, rows), ""]
    if plots:
        plot_pareto(runs, baselines, root / "pareto.png", title=f"OHQ sweep ({len(runs)} runs)")
        plot_pareto(runs, baselines, root / "pareto_size.png", x="size_bytes", title=f"OHQ sweep ({len(runs)} runs)")
        lines += ["![accuracy vs latency](pareto.png) ![accuracy vs size](pareto_size.png)", ""]
    (root / "sweep.md").write_text("\n".join(lines))
    return summary


class SweepSummary(HydraCallback):
    """Hydra callback: at the end of a multirun, summarise the sweep directory (see :func:`summarize`)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        """Write the summary into ``hydra.sweep.dir`` and print its table."""
        directory = Path(config.hydra.sweep.dir)
        try:
            summarize(directory)
        except ValueError as error:
            print(f"no sweep summary: {error}", file=sys.stderr)
            return
        print((directory / "sweep.md").read_text())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ohq_lightning.sweep DIR``: summarise the reports under DIR; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ohq_lightning.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="a sweep directory (its runs' report.json files are found recursively)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        summarize(args.directory, plots=not args.no_plots)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((Path(args.directory) / "sweep.md").read_text())
    return 0
