"""OHQCallback on a real timm model and on real data (scikit-learn's offline ``load_digits``)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ohq_lightning.lightning.callback as callback_module  # where the callback looks ``search`` up
from ohq_lightning.cli.data import digits_split
from ohq_lightning.lightning import OHQCallback
from ohq_lightning.quant import ActivationFakeQuant, QuantLayer, quantized_layers

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")

OPTIONS = ["w8a8", "w4a8", "w2a8"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One CPU thread, as on the shared benchmark machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64, seed: int | None = 0) -> DataLoader:
    """Batches of ``(image, label)``, shuffled in a fixed order (``seed=None``: not shuffled)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(images, labels), batch_size=batch_size, shuffle=seed is not None, generator=generator
    )


class Classifier(pl.LightningModule):
    """A network trained with cross-entropy by SGD with momentum and a per-epoch cosine schedule."""

    def __init__(self, network: nn.Module, lr: float = 0.05, epochs: int = 1) -> None:
        super().__init__()
        self.network = network
        self.lr = lr
        self.epochs = epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def small_cnn(width: int = 16) -> nn.Sequential:
    """Three convolutions (BatchNorm, ReLU) and a classifier: 10 classes."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


def quiet_trainer(root: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A one-device CPU Trainer that prints little and writes under ``root``."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        "callbacks": callbacks,
    }
    return pl.Trainer(**settings | kwargs)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` in eval mode."""
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


@torch.no_grad()
def settle_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> None:
    """Give a randomly initialised model's BatchNorm running statistics of ``images`` (cumulative averages).

    Calibration runs in eval mode (running statistics) and QAT in train mode (batch statistics);
    with a fresh init's running statistics (mean 0, variance 1) the two disagree by orders of
    magnitude, the activation step sizes clip almost everything in train mode and the first QAT
    steps blow up. A trained model does not need this.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for batch in images.split(batch_size):
        model(batch)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def no_search(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the callback searched although the checkpoint carries the plan")


def test_timm_model_fit_quantizes_and_checkpoint_reproduces_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real timm network: search + swap + calibration + 4 QAT steps, then ``test`` from the checkpoint."""
    data = digits_split(size=32, train_size=64)
    torch.manual_seed(0)
    model = Classifier(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10), lr=0.01)
    settle_batchnorm(model, data["x_train"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ohq = OHQCallback(compression_ratio=0.6, synthetic="gaussian", num_samples=4, progress=False)
    trainer = quiet_trainer(tmp_path, [ohq], max_steps=4)
    trainer.fit(model, loader(data["x_train"], data["y_train"], batch_size=16))
    checkpoint = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(checkpoint)

    plan = ohq.plan
    assert plan is not None and plan.predicted["size_ratio"] <= 0.6 + 1e-9
    assert len(set(plan.assignment.values())) > 1, plan.option_counts()  # a mixed plan
    layers = quantized_layers(model)
    assert len(layers) > 20
    assert {name: layer.option for name, layer in layers.items()} == {
        name: option for name, option in plan.assignment.items() if option != "fp32"
    }
    assert all(isinstance(model.get_submodule(name), QuantLayer) for name in layers)
    quantizers = [m for m in model.modules() if isinstance(m, ActivationFakeQuant)]
    assert quantizers and all(bool(q.calibrated) for q in quantizers)
    assert any(not torch.equal(layer.weight.detach(), before[f"{name}.weight"]) for name, layer in layers.items())

    images, labels = data["x_test"][:32], data["y_test"][:32]
    model.eval()
    with torch.no_grad():
        reference = model(images)
    test_loss = trainer.test(model, loader(images, labels, seed=None), verbose=False)[0]["test_loss"]

    monkeypatch.setattr(callback_module, "search", no_search)
    torch.manual_seed(123)  # other initial weights: everything must come from the checkpoint
    fresh = Classifier(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10))
    result = quiet_trainer(tmp_path / "fresh", [OHQCallback()]).test(
        fresh, loader(images, labels, seed=None), ckpt_path=checkpoint, verbose=False
    )
    assert result[0]["test_loss"] == pytest.approx(test_loss, rel=1e-5)
    assert {name: layer.option for name, layer in quantized_layers(fresh).items()} == {
        name: layer.option for name, layer in layers.items()
    }
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), reference)


def test_qat_beats_calibration_only_on_digits_for_the_same_low_bit_plan(tmp_path: Path) -> None:
    """At ``compression_ratio=0.3`` the big convolutions go to 2 bits: calibration alone loses much of the
    accuracy, two epochs of QAT with the same plan win it back (seeds 0-2: QAT - calibration-only
    = 0.30 to 0.80, QAT within 0.025 of float)."""
    data = digits_split(seed=0, size=16)
    pl.seed_everything(0, verbose=False)
    network = small_cnn()
    quiet_trainer(tmp_path, [], max_epochs=8).fit(
        Classifier(network, lr=0.05, epochs=8), loader(data["x_train"], data["y_train"])
    )
    float_acc = accuracy(network, data["x_test"], data["y_test"])
    assert float_acc >= 0.95

    calibrated = Classifier(copy.deepcopy(network).train())
    search = OHQCallback(
        compression_ratio=0.3, options=OPTIONS, synthetic="gaussian", finetune=False, seed=0, progress=False
    )
    quiet_trainer(tmp_path, [search], max_epochs=1).fit(calibrated, loader(data["x_train"], data["y_train"]))
    plan = search.plan
    assert plan.predicted["size_ratio"] <= 0.3 + 1e-9
    assert plan.option_counts().get("w2a8", 0) >= 2, plan.option_counts()
    calibrated_acc = accuracy(calibrated, data["x_test"], data["y_test"])

    pl.seed_everything(0, verbose=False)
    qat = Classifier(copy.deepcopy(network).train(), lr=0.01, epochs=2)
    quiet_trainer(tmp_path, [OHQCallback(plan=plan, seed=0, progress=False)], max_epochs=2).fit(
        qat, loader(data["x_train"], data["y_train"])
    )
    qat_acc = accuracy(qat, data["x_test"], data["y_test"])

    assert {n: layer.option for n, layer in quantized_layers(qat).items()} == {
        n: layer.option for n, layer in quantized_layers(calibrated).items()
    }
    summary = f"float {float_acc:.3f}, calibration only {calibrated_acc:.3f}, QAT {qat_acc:.3f}"
    assert qat_acc >= calibrated_acc + 0.15, summary
    assert qat_acc >= float_acc - 0.05, summary
