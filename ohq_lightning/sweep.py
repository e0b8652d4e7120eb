"""Compatibility module: the sweep summary now lives in :mod:`ohq_lightning.report.sweep`.

Kept because the README documents the command ``python -m ohq_lightning.sweep DIR`` (it runs the same
:func:`~ohq_lightning.report.sweep.main`) and older Hydra configs name ``ohq_lightning.sweep.SweepSummary``.
"""

from __future__ import annotations

from ohq_lightning.report.sweep import SweepSummary, collect_reports, main, summarize

__all__ = ["SweepSummary", "collect_reports", "main", "summarize"]

if __name__ == "__main__":
    raise SystemExit(main())
