"""What :class:`~ohq_lightning.lightning.OHQCallback` feeds the model: the example it searches with and the
batches it calibrates on, taken from the ``Trainer``'s train dataloader when not given."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device

from ohq_lightning.config import SearchConfig
from ohq_lightning.sensitivity.synthetic import synthetic_inputs

__all__ = [
    "CALIBRATION_SOURCES",
    "default_input_fn",
    "example_inputs_of",
    "first_sample",
    "model_inputs",
    "module_device",
    "synthetic_batches",
    "train_loader",
]

CALIBRATION_SOURCES = ("train", "synthetic")
"""Where :class:`~ohq_lightning.lightning.OHQCallback` takes its calibration batches from (``None`` skips
calibration)."""


def default_input_fn(batch: Any) -> Any:
    """The model input of a training batch: the batch itself if it is a tensor, else its first element.

    * a tensor: the batch;
    * a tuple or list (``(x, y)``): its first element;
    * a mapping (``{"image": x, "label": y}``): its first value.

    What it returns is what the model is called with: a tensor (``model(x)``), a tuple or list of
    arguments (``model(*x)``) or a dict of keywords (``model(**x)``). Give ``OHQCallback`` an
    ``input_fn`` for batches this rule does not fit.

    Example:
        >>> default_input_fn((torch.zeros(2, 3), torch.zeros(2))).shape
        torch.Size([2, 3])
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return batch[0]
    if isinstance(batch, Mapping) and len(batch) > 0:
        return next(iter(batch.values()))
    raise ValueError(
        f"cannot tell the model input in a batch of type {type(batch).__name__}: pass "
        "OHQCallback(input_fn=...) (batch -> model input) or OHQCallback(example_inputs=...)"
    )


def module_device(module: torch.nn.Module) -> torch.device:
    """Where the module's parameters are (``LightningModule.device`` is faked during ``setup``)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def first_sample(example: Any) -> Any:
    """The first sample of a batch tensor (other inputs as they are): the search traces batch 1."""
    if isinstance(example, torch.Tensor) and example.dim() > 0 and example.shape[0] > 1:
        return example[:1]
    return example


def train_loader(trainer: pl.Trainer) -> Iterable[Any]:
    """The train dataloader the fit runs on (the first one of a mapping or sequence of loaders)."""
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is None or not source.is_defined():
        raise ValueError(
            "OHQCallback found no train dataloader to take inputs from: pass example_inputs= "
            "(and calibration='synthetic' or None)"
        )
    loader = source.dataloader()
    if isinstance(loader, Mapping) and loader:
        loader = next(iter(loader.values()))
    elif isinstance(loader, (list, tuple)) and loader and not isinstance(loader[0], torch.Tensor):
        loader = loader[0]
    return loader


def model_inputs(
    trainer: pl.Trainer, input_fn: Callable[[Any], Any], device: torch.device, count: int
) -> Iterator[Any]:
    """The model inputs (``input_fn`` of each batch) of the first ``count`` train batches, on ``device``.

    A generator: the dataloader is only read when the inputs are.
    """
    for batch in islice(iter(train_loader(trainer)), count):
        yield move_data_to_device(input_fn(batch), device)


def example_inputs_of(
    trainer: pl.Trainer, pl_module: pl.LightningModule, given: Any, input_fn: Callable[[Any], Any]
) -> Any:
    """The input the search traces ``pl_module`` with, on the module's device.

    In this order: ``given`` (the callback's ``example_inputs``), the module's
    ``example_input_array`` (Lightning's declaration of what ``forward`` takes; both used as they
    are), else the first sample of the first train batch.
    """
    device = module_device(pl_module)
    declared = given if given is not None else getattr(pl_module, "example_input_array", None)
    if declared is not None:
        return move_data_to_device(declared, device)
    first = next(model_inputs(trainer, input_fn, device, 1), None)
    if first is None:
        raise ValueError("the train dataloader is empty: OHQCallback needs a batch (or example_inputs=)")
    return first_sample(first)


def synthetic_batches(
    module: torch.nn.Module, example: Any, config: SearchConfig, count: int, *, progress: bool = True
) -> list[torch.Tensor]:
    """``config``'s kind and number of synthetic inputs for the float ``module``, split into ``count`` batches."""
    inputs = synthetic_inputs(
        module,
        example,
        kind=config.synthetic,
        num_samples=config.num_samples,
        seed=config.seed,
        steps=config.distill_steps,
        progress=progress,
    )
    return list(inputs.chunk(count))
