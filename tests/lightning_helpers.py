"""Tiny LightningModules, loaders and spy callbacks for the callback tests.

They live in their own module (not in a test file) so that ``ddp_spawn`` workers can unpickle them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ohq_lightning.hardware import AnalyticalTarget
from ohq_lightning.lightning import OHQCallback
from ohq_lightning.quant import QuantLayer, quantized_layers
from ohq_lightning.quant.fake_quant import ActivationFakeQuant
from ohq_lightning.quant.modules import is_weight_pruned


def random_images(count: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 3x8x8 images and labels of 10 classes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, 8, 8, generator=generator), torch.randint(0, 10, (count,), generator=generator)


def image_loader(count: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """``(image, label)`` batches, in a fixed order."""
    return DataLoader(TensorDataset(*random_images(count, seed)), batch_size=batch_size)


class _DictDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


def dict_loader(count: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """``{"image": ..., "label": ...}`` batches, in a fixed order."""
    return DataLoader(_DictDataset(*random_images(count, seed)), batch_size=batch_size)


class TinyCNN(pl.LightningModule):
    """Two convs and a classifier on 8x8 images, 10 classes."""

    def __init__(self, lr: float = 0.05, nan_at_batch: int | None = None, corrupt_at_batch: int | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, 10)
        self.lr = lr
        self.nan_at_batch = nan_at_batch
        self.corrupt_at_batch = corrupt_at_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if batch_idx == self.corrupt_at_batch:  # a step size gone bad, as a diverging QAT would leave it
            with torch.no_grad():
                self.features[3].input_quantizer.log_scale.fill_(float("nan"))
        loss = F.cross_entropy(self(x), y)
        if batch_idx == self.nan_at_batch:
            loss = loss * float("nan")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class KeywordCNN(pl.LightningModule):
    """A CNN whose forward takes a keyword argument, trained on dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = nn.Linear(8, 10)

    def forward(self, image: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        return self.classifier(F.relu(self.conv(image)).mean((2, 3))) / temperature

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["image"], temperature=0.5), batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class KeywordOnlyCNN(KeywordCNN):
    """The same CNN called with keywords only: ``model(image=x)``."""

    def forward(self, *, image: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:  # type: ignore[override]
        return super().forward(image, temperature=temperature)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(image=batch["image"], temperature=0.5), batch["label"])


def image_keyword(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``input_fn`` for :class:`KeywordOnlyCNN`: the model is called as ``model(image=...)``."""
    return {"image": batch["image"]}


@dataclass(frozen=True)
class MarkingTarget(AnalyticalTarget):
    """The analytical target, leaving a file ``searched-rank<r>`` in ``marker_dir`` when its costs are asked for."""

    marker_dir: str = ""

    def costs(self, *args: Any, **kwargs: Any) -> Any:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        Path(self.marker_dir, f"searched-rank{rank}").write_text("searched\n")
        return super().costs(*args, **kwargs)


class FitStartRecorder(pl.Callback):
    """At ``on_fit_start`` (after setup, before any step) write what each rank holds to ``rank<r>.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ohq = next(callback for callback in trainer.callbacks if isinstance(callback, OHQCallback))
        quantizers = [m for m in pl_module.modules() if isinstance(m, ActivationFakeQuant)]
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        record = {
            "plan": ohq.plan.to_dict() if ohq.plan is not None else None,
            "quantized": {name: layer.option for name, layer in quantized_layers(pl_module).items()},
            "calibrated": [bool(q.calibrated) for q in quantizers],
            "step_sizes_optimized": all(id(q.log_scale) in optimized for q in quantizers),
        }
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class PruningRecorder(pl.Callback):
    """Watches what the fake-quant layers compute with while ``ModelPruning`` prunes (single process).

    * ``pruned[epoch]``: at each epoch start, ``module name -> its pruning masks`` of every module;
    * ``used``: at every train batch end, ``(epoch, layer name, the weight its wrapped module's
      forward really used, its mask or None)``.
    """

    def __init__(self) -> None:
        self.pruned: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self.used: list[tuple[int, str, torch.Tensor, torch.Tensor | None]] = []
        self._last: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, layer in quantized_layers(pl_module).items():
            self._handles.append(layer.module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._last[name] = module.weight.detach().clone()  # inside the call: the weight it computed with

        return hook

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        self.pruned[epoch] = {
            name: {key: buffer.clone() for key, buffer in module._buffers.items() if key.endswith("_mask")}
            for name, module in pl_module.named_modules()
            if any(key.endswith("_mask") for key in module._buffers)
        }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for name, layer in quantized_layers(pl_module).items():
            mask = layer.module.weight_mask.clone() if is_weight_pruned(layer.module) else None
            self.used.append((trainer.current_epoch, name, self._last[name], mask))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def fake_quant_module_names(model: nn.Module) -> set[str]:
    """Names of the fake-quant wrappers and of their quantizers (what pruning must never touch)."""
    names = set()
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLayer):
            names.add(name)
            names.update(f"{name}.{child}" for child in ("weight_quantizer", "input_quantizer"))
    return names
