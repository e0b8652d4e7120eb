"""Compatibility module: the Lightning callback now lives in :mod:`ohq_lightning.lightning` (same names).

``from ohq_lightning.callback import OHQCallback`` keeps working; new code imports from
``ohq_lightning.lightning`` (or ``ohq_lightning`` itself).
"""

from ohq_lightning.lightning import (
    CALIBRATION_SOURCES,
    OHQCallback,
    QATDivergedError,
    default_input_fn,
    plan_from_checkpoint,
)

__all__ = ["CALIBRATION_SOURCES", "OHQCallback", "QATDivergedError", "default_input_fn", "plan_from_checkpoint"]
