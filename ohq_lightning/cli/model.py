"""The network of the Hydra job: a timm model, its weights, and the LightningModule that trains it."""

from __future__ import annotations

import functools
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from ohq_lightning.cli.config import TrainConfig

__all__ = ["OPTIMIZERS", "Classifier", "build_model", "classifier", "fit_quietly", "load_weights"]

_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": functools.partial(torch.optim.SGD, momentum=0.9),
    "adamw": torch.optim.AdamW,
}
OPTIMIZERS = tuple(_OPTIMIZERS)
"""The optimizers ``train.optimizer`` may name."""

_PREFIXES = ("model.", "module.", "network.")


def _cached_pretrained_file(name: str) -> str:
    """The local file of timm's pretrained weights for ``name``; a clear error when they are not cached."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained weights for {name!r}")
    repo = cfg.hf_hub_id
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin", cfg.hf_hub_filename):
            if filename:
                found = try_to_load_from_cache(repo, filename)
                if isinstance(found, str):
                    return found
    if cfg.file and Path(cfg.file).is_file():
        return str(cfg.file)
    raise ValueError(
        f"model.pretrained=true: timm's weights for {name!r} are not in the local cache (Hugging Face hub "
        f"{repo or cfg.url or '?'}) and nothing is downloaded here. Fetch them once on a machine with network "
        f"(timm.create_model({name!r}, pretrained=True)) and copy the cache (~/.cache/huggingface), or pass "
        "model.checkpoint=/path/to/weights"
    )


_EXPECTED = "expected a state dict (torch.save(model.state_dict(), path)), a .safetensors file or a Lightning .ckpt"


def _not_a_checkpoint(path: Path, error: Exception) -> ValueError:
    """One line naming the file, what it seems to be and what was expected (never torch's unpickling advice)."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        what = f"it holds a pickled {found.group(1)}, not only tensors (only tensors and plain containers are read)"
    elif isinstance(error, EOFError) or "central directory" in text:
        what = "the file is empty or truncated"
    elif "PytorchStreamReader" in text:
        what = "a damaged torch.save archive"
    elif path.suffix == ".safetensors":
        what = f"not a readable .safetensors file ({text.splitlines()[0] if text else type(error).__name__})"
    else:
        what = "not a file torch.save or safetensors writes"
    return ValueError(f"model.checkpoint={str(path)!r} is not a checkpoint: {what}; {_EXPECTED}")


def _read(path: Path) -> Any:
    """The file's contents, parsed without running pickled code (``weights_only=True``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with warnings.catch_warnings():  # a foreign pickle protocol: refused below, with one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to parse means the file is not a checkpoint we can read
        raise _not_a_checkpoint(path, error) from error


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    data = _read(path)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"model.checkpoint={str(path)!r} holds no state dict (tensors by name); {_EXPECTED}")
    return data


def load_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Load a state dict (``.pth``/``.pt``/``.safetensors``, or a Lightning ``.ckpt``) into ``model``, strictly.

    Keys prefixed ``model.``/``module.``/``network.`` (a LightningModule or DDP wrapper) are
    matched without the prefix. Missing or unexpected keys and shape mismatches are reported by
    name. Files are read with ``weights_only=True`` (no pickle code runs).
    """
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ValueError(f"model.checkpoint={str(checkpoint)!r} does not exist")
    state = _state_dict(path)
    own = model.state_dict()
    for prefix in _PREFIXES:
        if state and not any(key in own for key in state) and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    shapes = [
        f"{key}: {tuple(value.shape)} in the file, {tuple(own[key].shape)} in the model"
        for key, value in state.items()
        if key in own and own[key].shape != value.shape
    ]
    if shapes:
        raise ValueError(f"{path} does not fit the model (a different number of classes?): " + "; ".join(shapes[:5]))
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    model.load_state_dict(state)


def build_model(name: str, *, num_classes: int, checkpoint: str | None = None, pretrained: bool = False) -> nn.Module:
    """A timm model by name with ``num_classes`` outputs; weights from ``checkpoint``, timm's local cache, or random.

    Nothing is downloaded: ``pretrained=True`` reads timm's weights from the local cache only (the
    classifier is replaced when ``num_classes`` differs from the weights').

    Example:
        >>> build_model("resnet10t", num_classes=10).num_classes
        10
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise ValueError(f"unknown timm model {name!r}; similar names: {close}")
    if checkpoint and pretrained:
        raise ValueError("give model.checkpoint or model.pretrained=true, not both")
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = {"file": _cached_pretrained_file(name)}
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint)
    return model


class Classifier(pl.LightningModule):
    """A classification network trained with cross-entropy and a per-epoch cosine learning-rate schedule.

    Args:
        model: the network (its ``forward`` gives logits).
        lr: peak learning rate.
        epochs: length of the cosine schedule.
        weight_decay: weight decay (L2 for SGD, decoupled for AdamW).
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adamw"`` (MobileNets trained from scratch diverged
            with SGD at the learning rates that suit ResNets here).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 0.05,
        epochs: int = 1,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
        self.model = model
        self.lr = lr
        self.epochs = epochs
        self.weight_decay = weight_decay
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x``."""
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy of one batch (logged as ``train_loss``)."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        """The optimizer (SGD with momentum, or AdamW) and a cosine learning-rate schedule over ``epochs``."""
        optimizer = _OPTIMIZERS[self.optimizer](self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.epochs))
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def classifier(
    model: nn.Module, train: TrainConfig, *, lr: float | None = None, epochs: int | None = None
) -> Classifier:
    """A :class:`Classifier` with the optimizer settings of ``train`` (``lr``/``epochs`` override its own)."""
    return Classifier(
        model,
        lr=train.lr if lr is None else lr,
        epochs=train.epochs if epochs is None else epochs,
        weight_decay=train.weight_decay,
        optimizer=train.optimizer,
    )


def fit_quietly(
    module: pl.LightningModule,
    loader: Any,
    epochs: int,
    *,
    callbacks: Sequence[pl.Callback] = (),
    root: str | Path | None = None,
) -> float:
    """Fit ``module`` on the CPU for ``epochs`` epochs with no logger, checkpoint or bar; return the seconds.

    Without ``root`` the trainer writes (e.g. an OHQ plan) into a temporary directory.
    """
    with tempfile.TemporaryDirectory() as scratch:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(root or scratch),
            callbacks=list(callbacks),
        )
        started = time.perf_counter()
        trainer.fit(module, loader)
        return time.perf_counter() - started
