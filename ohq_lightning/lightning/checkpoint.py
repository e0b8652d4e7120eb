"""What a checkpoint tells :class:`~ohq_lightning.lightning.OHQCallback` before its weights load.

Lightning 2.6 loads the model weights *before* any callback's ``load_state_dict``, and sets
``trainer.ckpt_path`` only after the ``setup`` hooks. So the callback reads the checkpoint file
itself in ``setup`` (:func:`inspect_checkpoint`): the stored plan, whether the weights hold fake-quant
layers, and which tensors were saved pruned; it finds the path on the running ``Trainer._run`` call
(:func:`pending_checkpoint`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import _load as load_remote  # remote paths (s3://, http...), as Lightning
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.utils import prune

from ohq_lightning.lightning.qat import swapped_assignment
from ohq_lightning.plan import QuantPlan

__all__ = [
    "STATE_KEY",
    "WEIGHTS_ONLY_MESSAGE",
    "CheckpointInfo",
    "checkpoint_plan",
    "inspect_checkpoint",
    "load_checkpoint",
    "pending_checkpoint",
    "plan_from_checkpoint",
    "restore_pruning",
]

STATE_KEY = "OHQCallback"
"""The key of the callback's state in a checkpoint's ``"callbacks"`` (Lightning's ``Callback.state_key``)."""

WEIGHTS_ONLY_MESSAGE = (
    "the checkpoint holds fake-quant weights but no OHQ plan (was it saved with save_weights_only=True? that drops "
    "callback states): pass the plan itself, OHQCallback(plan='plan.json') (the plan.json the callback wrote to the "
    "log dir)"
)

_QUANT_STATE_SUFFIXES = (
    ".weight_quantizer.log_scale",
    ".input_quantizer.log_scale",
    ".input_quantizer.calibrated",
    ".weight_quantizer.scale",  # checkpoints written before step sizes were learned in log space
    ".input_quantizer.scale",
)


class CheckpointInfo(NamedTuple):
    """What :class:`~ohq_lightning.lightning.OHQCallback` needs to know of a checkpoint before its weights load."""

    plan: QuantPlan | None
    """The stored plan, if any."""
    quantized: bool
    """Whether the weights hold fake-quant layers."""
    pruned: list[str]
    """Tensors saved pruned (``<name>_orig`` and ``<name>_mask``), e.g. ``"features.0.module.weight"``."""


def load_checkpoint(path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
    """Read a checkpoint onto the CPU (memory-mapped when it is a local file)."""
    if os.path.isfile(path):
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
        except RuntimeError:  # e.g. a legacy (non-zip) file cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    return load_remote(path, map_location="cpu", weights_only=weights_only)


def plan_from_checkpoint(
    checkpoint: str | Path | Mapping[str, Any], *, weights_only: bool | None = None
) -> QuantPlan | None:
    """The OHQ plan stored in a Lightning checkpoint by ``OHQCallback``, or ``None`` for a float checkpoint.

    Use it to rebuild a quantized module without a ``Trainer``::

        plan = plan_from_checkpoint("last.ckpt")
        model = MyModule()
        apply_plan(model, plan)
        model.load_state_dict(torch.load("last.ckpt", weights_only=True)["state_dict"])

    Args:
        checkpoint: a path (or URL) to a ``.ckpt`` file, or a checkpoint dict already loaded.
        weights_only: passed to :func:`torch.load` (``None``: torch's default, as Lightning does; that
            is ``True`` since torch 2.6, so no pickled object is unpickled unless you pass ``False``).

    Raises:
        ValueError: the file does not exist, or the checkpoint holds fake-quant weights but no plan
            (it was saved with ``save_weights_only=True``, which drops callback states).
    """
    info = inspect_checkpoint(checkpoint, weights_only)
    if info.plan is None and info.quantized:
        raise ValueError(WEIGHTS_ONLY_MESSAGE)
    return info.plan


def _pruned_tensors(weights: Mapping[str, Any]) -> list[str]:
    """The tensors a state dict holds in :mod:`torch.nn.utils.prune`'s form, ``<name>_orig`` + ``<name>_mask``."""
    keys = {str(key) for key in weights}
    names = (key.removesuffix("_mask") for key in keys if key.endswith("_mask"))
    return sorted(name for name in names if f"{name}_orig" in keys)


def _stored_plan(states: Mapping[str, Any], state_key: str) -> QuantPlan | None:
    """The first plan among the callback states, ``state_key``'s first (a renamed subclass still finds it)."""
    ordered = sorted(states.items(), key=lambda item: item[0] != state_key)
    for _, state in ordered:
        if isinstance(state, Mapping) and isinstance(state.get("plan"), Mapping) and "assignment" in state["plan"]:
            return QuantPlan.from_dict(dict(state["plan"]))
    return None


def inspect_checkpoint(
    checkpoint: str | Path | Mapping[str, Any], weights_only: bool | None = None, state_key: str = STATE_KEY
) -> CheckpointInfo:
    """The stored plan, whether the weights hold fake-quant layers, and which tensors were saved pruned."""
    if isinstance(checkpoint, Mapping):
        data = checkpoint
    else:
        if not (os.path.isfile(checkpoint) or "://" in str(checkpoint)):
            raise ValueError(f"checkpoint file {str(checkpoint)!r} does not exist")
        data = load_checkpoint(checkpoint, weights_only)
    weights = data.get("state_dict") or {}
    quantized = any(str(key).endswith(_QUANT_STATE_SUFFIXES) for key in weights)
    return CheckpointInfo(_stored_plan(data.get("callbacks") or {}, state_key), quantized, _pruned_tensors(weights))


def checkpoint_plan(
    checkpoint: CheckpointInfo, ckpt_path: Any, *, given: QuantPlan | None, fitting: bool
) -> tuple[QuantPlan | None, str]:
    """The plan for a run that loads ``checkpoint``, and where it came from (``None``: a float model).

    The checkpoint's own plan, which must swap what ``given`` swaps; the ``given`` plan for a
    weights-only checkpoint of a quantized model (it stores none). A fit cannot resume a float
    checkpoint with quantization-aware training.
    """
    stored = checkpoint.plan
    if stored is None and checkpoint.quantized:
        if given is None:
            raise ValueError(WEIGHTS_ONLY_MESSAGE)
        return given, "given"
    if stored is not None:
        if given is not None and swapped_assignment(given.assignment) != swapped_assignment(stored.assignment):
            raise ValueError(
                f"the checkpoint {str(ckpt_path)!r} was quantized with a different plan than this "
                "OHQCallback's: drop plan= (the checkpoint carries its own) or use another checkpoint"
            )
        return stored, f"checkpoint {ckpt_path}"
    if fitting:
        raise ValueError(
            f"the checkpoint {str(ckpt_path)!r} holds no OHQ plan (a float model): quantization-aware "
            "training cannot resume from it. Load its weights first (MyModule.load_from_checkpoint) and "
            "call fit without ckpt_path"
        )
    if given is not None:
        rank_zero_warn(f"the checkpoint {str(ckpt_path)!r} is a float model: the OHQ plan is not applied")
    return None, ""


def restore_pruning(module: nn.Module, pruned: Sequence[str]) -> list[str]:
    """Re-parametrise, as :mod:`torch.nn.utils.prune` does, the tensors a checkpoint saved pruned; returns them.

    A checkpoint saved while pruning was not permanent (``ModelPruning(make_pruning_permanent=False)``)
    holds ``<name>_orig`` and ``<name>_mask`` where a fresh module has ``<name>``. Each such parameter
    gets an identity pruning (a mask of ones, which the checkpoint then overwrites), and
    ``<name>_orig`` takes ``<name>``'s place among the module's parameters, so an optimizer built
    next lists the parameters in the order the checkpoint's optimizer state was saved in (pruning
    applied during a fit comes after ``configure_optimizers``). Modules already pruned and names the
    module does not have are left alone (a strict load then reports them).
    """
    restored = []
    for path in pruned:
        prefix, _, name = path.rpartition(".")
        try:
            owner = module.get_submodule(prefix)
        except AttributeError:
            continue
        if f"{name}_orig" in owner._parameters or not isinstance(owner._parameters.get(name), nn.Parameter):
            continue
        order = list(owner._parameters)
        with torch.no_grad():  # the masked value the hook leaves on the module stays a leaf (deepcopy works)
            prune.identity(owner, name)
        parameters = owner._parameters
        reordered = {key: parameters[key] for key in (f"{name}_orig" if key == name else key for key in order)}
        parameters.clear()
        parameters.update(reordered)
        restored.append(path)
    return restored


def pending_checkpoint(trainer: pl.Trainer) -> tuple[Any, bool | None]:
    """The checkpoint path (and ``weights_only``) the running fit/validate/test/predict will load, if any.

    Lightning resolves ``ckpt_path`` (``"last"``, ``"best"``, a path) before ``Trainer._run`` and
    passes it as an argument, but only stores it in ``trainer.ckpt_path`` after the ``setup`` hooks.
    During ``setup`` the one place that holds it is that ``_run`` call, so look it up on the stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_run" and frame.f_locals.get("self") is trainer:
            return frame.f_locals.get("ckpt_path"), frame.f_locals.get("weights_only")
        frame = frame.f_back
    rank_zero_warn("OHQCallback could not find the checkpoint path this run loads; assuming none")
    return None, None
