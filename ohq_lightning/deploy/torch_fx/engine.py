"""torch's quantized engines, and the one place torch.ao.quantization's warnings are silenced.

FX graph-mode quantization (``torch.ao.quantization``) is deprecated upstream; the torch runtime
uses it only inside :func:`quiet`. The engine (``"x86"`` picks fbgemm/oneDNN kernels, ``"qnnpack"``
is the engine of ARM boards) is set only while building (weights are packed for it) and while
running, then restored.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

__all__ = ["ENGINES", "quantized_engine", "quiet"]

ENGINES: tuple[str, ...] = ("x86", "fbgemm", "onednn", "qnnpack")
"""torch's quantized engines the torch runtime accepts."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation and FX warnings (the torch runtime only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
        yield


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Run a block with torch's quantized engine set to ``engine``, restoring the previous one after."""
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"quantized engine {engine!r} is not available in this torch build; "
            f"available: {torch.backends.quantized.supported_engines}"
        )
    previous = torch.backends.quantized.engine
    if previous == engine:
        yield
        return
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
