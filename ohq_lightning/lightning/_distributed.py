"""Work done once, on global rank 0, whose result every rank needs (e.g. the search: all ranks build one model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

__all__ = ["from_rank_zero"]


def from_rank_zero(trainer: pl.Trainer, compute: Callable[[], Any], what: str) -> Any:
    """``compute()`` run on global rank 0 and broadcast to every rank (the result must pickle).

    A failure on rank 0 is raised there as it is and, on the other ranks, as a ``RuntimeError``
    naming ``what`` and the error, rather than leaving them waiting in the broadcast.
    """
    payload: dict[str, Any] = {}
    failure: BaseException | None = None
    if trainer.is_global_zero:
        try:
            payload = {"result": compute()}
        except Exception as error:  # tell the other ranks rather than leave them waiting in broadcast
            failure = error
            payload = {"error": f"{type(error).__name__}: {error}"}
    payload = trainer.strategy.broadcast(payload, src=0)
    if failure is not None:
        raise failure
    if "error" in payload:
        raise RuntimeError(f"{what} failed on global rank 0: {payload['error']}")
    return payload["result"]
