"""Progress bars for long work (calibration, synthetic data, MQE, profiling)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(
    items: Iterable[T], *, desc: str, enabled: bool = True, total: int | None = None, **kwargs: Any
) -> Any:
    """Wrap ``items`` in a tqdm bar named ``desc`` (on stderr); ``enabled=False`` returns a silent bar."""
    return tqdm(items, desc=desc, total=total, disable=not enabled, leave=False, dynamic_ncols=True, **kwargs)
