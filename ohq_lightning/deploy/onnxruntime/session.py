"""ONNX Runtime inference sessions on the CPU, set up the same way for deployment and for timing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["ORT_DISABLED_OPTIMIZERS", "ort_runner", "ort_session"]

#: ORT would otherwise quantize a float layer it finds between a dequantize and a quantize on its own,
#: running layers in int8 that the plan leaves in float.
ORT_DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def ort_session(model_bytes: bytes, threads: int, *, spinning: bool = False) -> Any:
    """An ``InferenceSession`` on the CPU with the settings that matter here.

    All graph optimisations are on (fusions, blocked layouts), except :data:`ORT_DISABLED_OPTIMIZERS`.
    Intra-op worker threads do not spin-wait between runs unless ``spinning`` is set: timings here run
    several sessions in turn, and one session's spinning workers take cores from the next. A
    deployment that serves one model alone can turn spinning back on (faster there). At 1 thread
    there are no workers and the setting changes nothing. Measurements: ``docs/notes/deploy.md``.
    """
    import onnxruntime as ort  # deferred: onnxruntime is heavy to import

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(
        model_bytes,
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS),
    )


def ort_runner(model: Any, feed: dict[str, np.ndarray], threads: int) -> Callable[[], object]:
    """A no-argument callable that runs ``model`` once on ``feed`` in a fresh session."""
    session = ort_session(model.SerializeToString(), threads)
    return lambda: session.run(None, feed)
