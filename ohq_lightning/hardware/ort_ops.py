"""Deprecated: ONNX Runtime sessions and one-op graphs moved to :mod:`ohq_lightning.deploy.onnxruntime`.

Import ``ort_session``, ``ort_runner``, ``layer_graph``, ``transition_graph``, ``ORT_KERNELS`` and
``ORT_DISABLED_OPTIMIZERS`` from :mod:`ohq_lightning.deploy` instead; this module re-exports them
for one release.
"""

from __future__ import annotations

import warnings

from ohq_lightning.deploy.onnxruntime import (
    ORT_DISABLED_OPTIMIZERS,
    ORT_KERNELS,
    layer_graph,
    ort_runner,
    ort_session,
    transition_graph,
)

__all__ = ["ORT_DISABLED_OPTIMIZERS", "ORT_KERNELS", "layer_graph", "ort_runner", "ort_session", "transition_graph"]

warnings.warn(
    "ohq_lightning.hardware.ort_ops is deprecated: ort_session, ort_runner, layer_graph, transition_graph, "
    "ORT_KERNELS and ORT_DISABLED_OPTIMIZERS moved to ohq_lightning.deploy (ohq_lightning.deploy.onnxruntime)",
    DeprecationWarning,
    stacklevel=2,
)
