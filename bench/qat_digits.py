"""Calibration only vs. quantization-aware fine-tuning (QAT) with ``OHQCallback``, on real data.

The data is scikit-learn's built-in, offline ``load_digits`` (1,797 8x8 grey images of 10 digits):
a fixed seeded split (1,200 train / 597 test), pixels / 16, normalised with the train mean and
standard deviation, upsampled to 32x32 (bilinear) and repeated to 3 channels. The bench

1. trains a float timm model (``resnet10t`` by default, random init) for a few epochs;
2. at each compression ratio (0.5, and 0.26 where most weight bytes go to 2 bits), from copies of
   that model, applies the same low-bit plan twice: searched once by
   ``OHQCallback(compression_ratio=..., options=w8a8/w4a8/w2a8, finetune=False)`` (calibration
   only, on 4 train batches), then given as ``plan=`` to ``OHQCallback(finetune=True)`` for a few
   QAT epochs;
3. prints one JSON object: the test accuracy of the float model and, per ratio, of the
   calibration-only and QAT models, the plan's option counts and predicted size ratio, and the
   seconds of each phase.

Everything runs on the CPU, on one thread by default (about 80 s for ``resnet10t``).

    python bench/qat_digits.py [--model resnet10t] [--ratios 0.5 0.26] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ohq_lightning.cli.data import digits_split
from ohq_lightning.cli.model import Classifier, fit_quietly
from ohq_lightning.lightning import OHQCallback
from ohq_lightning.plan import QuantPlan
from ohq_lightning.quant import quantized_layers

OPTIONS = ("w8a8", "w4a8", "w2a8")


def train_loader(data: dict[str, torch.Tensor], batch_size: int = 64, seed: int = 0) -> DataLoader:
    """Shuffled train batches, in an order fixed by ``seed``."""
    return DataLoader(
        TensorDataset(data["x_train"], data["y_train"]),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` in eval mode."""
    model.eval()
    correct = sum(
        int((model(x).argmax(1) == y).sum())
        for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True)
    )
    return correct / len(labels)


def quantize(
    network: nn.Module,
    data: dict[str, torch.Tensor],
    root: str,
    *,
    ratio: float,
    synthetic: str,
    qat_epochs: int,
    qat_lr: float,
    seed: int,
) -> dict[str, Any]:
    """Calibration only, then QAT with the same plan, each on a copy of the float ``network``."""
    seconds: dict[str, float] = {}
    # copies in train mode: Lightning keeps a module's mode, and QAT with frozen BatchNorm diverges here
    pl.seed_everything(seed, verbose=False)
    calibrated = Classifier(copy.deepcopy(network).train(), lr=qat_lr, epochs=qat_epochs)
    search = OHQCallback(
        compression_ratio=ratio, options=list(OPTIONS), synthetic=synthetic, finetune=False, seed=seed, progress=False
    )
    loader = train_loader(data, seed=seed)
    seconds["search_and_calibrate"] = fit_quietly(calibrated, loader, 1, callbacks=[search], root=root)
    plan: QuantPlan = search.plan
    calibrated_acc = accuracy(calibrated, data["x_test"], data["y_test"])

    pl.seed_everything(seed, verbose=False)
    qat = Classifier(copy.deepcopy(network).train(), lr=qat_lr, epochs=qat_epochs)
    given = OHQCallback(plan=plan, finetune=True, seed=seed, progress=False)
    loader = train_loader(data, seed=seed)
    seconds["calibrate_and_qat"] = fit_quietly(qat, loader, qat_epochs, callbacks=[given], root=root)
    qat_acc = accuracy(qat, data["x_test"], data["y_test"])
    applied = {name: layer.option for name, layer in quantized_layers(qat).items()}
    return {
        "compression_ratio": ratio,
        "accuracy": {"calibration_only": round(calibrated_acc, 4), "qat": round(qat_acc, 4)},
        "plan": {
            "option_counts": plan.option_counts(),
            "size_ratio": round(plan.predicted["size_ratio"], 4),
            "layers": len(plan.assignment),
            "same_plan_in_both_runs": applied == {n: layer.option for n, layer in quantized_layers(calibrated).items()},
        },
        "seconds": {key: round(value, 2) for key, value in seconds.items()},
    }


def run(
    *,
    model_name: str = "resnet10t",
    ratios: tuple[float, ...] = (0.5,),
    synthetic: str = "gaussian",
    epochs: int = 4,
    qat_epochs: int = 2,
    lr: float = 0.05,
    qat_lr: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Train float once, then calibrate-only and QAT at each ratio; the figures as a JSON-able dict."""
    data = digits_split(seed)
    with tempfile.TemporaryDirectory() as root:
        pl.seed_everything(seed, verbose=False)
        network = timm.create_model(model_name, pretrained=False, num_classes=10, in_chans=3)
        float_module = Classifier(network, lr=lr, epochs=epochs)
        float_seconds = fit_quietly(float_module, train_loader(data, seed=seed), epochs, root=root)
        float_acc = accuracy(float_module, data["x_test"], data["y_test"])
        runs = [
            quantize(
                network, data, root, ratio=ratio, synthetic=synthetic, qat_epochs=qat_epochs, qat_lr=qat_lr, seed=seed
            )
            for ratio in ratios
        ]
    return {
        "model": model_name,
        "data": {"name": "sklearn load_digits", "train": len(data["y_train"]), "test": len(data["y_test"]), "size": 32},
        "settings": {
            "options": list(OPTIONS),
            "hardware": "analytical",
            "synthetic": synthetic,
            "calibration": "train (4 batches of 64)",
            "epochs": epochs,
            "qat_epochs": qat_epochs,
            "lr": lr,
            "qat_lr": qat_lr,
            "seed": seed,
            "threads": torch.get_num_threads(),
        },
        "float": {"accuracy": round(float_acc, 4), "seconds": round(float_seconds, 2)},
        "quantized": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t", help="timm model name (random init)")
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=[0.5, 0.26], help="compression ratios of the plans (1.0 = INT8 size)"
    )
    parser.add_argument("--synthetic", default="gaussian", choices=["gaussian", "distilled"])
    parser.add_argument("--epochs", type=int, default=4, help="float training epochs")
    parser.add_argument("--qat-epochs", type=int, default=2, help="QAT epochs")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--qat-lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    started = time.perf_counter()
    result = run(
        model_name=args.model,
        ratios=tuple(args.ratios),
        synthetic=args.synthetic,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        lr=args.lr,
        qat_lr=args.qat_lr,
        seed=args.seed,
    )
    result["seconds_total"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
