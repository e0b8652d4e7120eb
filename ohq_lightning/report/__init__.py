"""What a search and a job leave behind, for people to read: tables, pictures and the summary of a sweep.

- :mod:`~ohq_lightning.report.tables`: Markdown tables of a plan (:func:`format_plan_table`) and of any rows.
- :mod:`~ohq_lightning.report.plots`: PNG pictures of a plan, of accuracy vs latency and of a sweep's Pareto front.
- :mod:`~ohq_lightning.report.sweep`: one summary over every run of a sweep (``python -m ohq_lightning.sweep DIR``
  and the Hydra callback ``SweepSummary``); import it by its path: it loads Hydra, which the rest does not need.

This layer sits above the pipeline (``search``) and below the Lightning callback and the Hydra app.
"""

from __future__ import annotations

from ohq_lightning.report.plots import pareto_front, plot_accuracy_latency, plot_pareto, plot_plan
from ohq_lightning.report.tables import format_plan_table, format_table

__all__ = [
    "format_plan_table",
    "format_table",
    "pareto_front",
    "plot_accuracy_latency",
    "plot_pareto",
    "plot_plan",
]
