"""Datasets of the Hydra job: the built-in offline digits, an ImageFolder tree, or CIFAR-10 from a local path.

Nothing is downloaded. ``digits`` is scikit-learn's bundled ``load_digits`` (1,797 real 8x8
handwritten digits): a seeded 1,200 / 597 train/test split, pixels normalised with the train
mean and standard deviation, resized (bilinear) to ``image_size`` and repeated to 3 channels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = ["DATASETS", "ImageData", "build_data", "digits_split"]

DATASETS = ("digits", "imagefolder", "cifar10")
"""The datasets ``data.name`` may name (one loader each in ``_LOADERS``)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class ImageData:
    """A train and a test split of one image-classification dataset, with what the job needs to know of it."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    image_size: int
    batch_size: int
    num_workers: int = 0
    seed: int = 0

    def train_loader(self) -> DataLoader:
        """Shuffled training batches, in an order fixed by the seed."""
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def test_loader(self, batch_size: int | None = None) -> DataLoader:
        """Test batches in order."""
        return DataLoader(self.test, batch_size=batch_size or self.batch_size, num_workers=self.num_workers)

    def example_input(self) -> torch.Tensor:
        """One test image as a batch of one (the shape the model is searched, deployed and timed at)."""
        return self.test[0][0].unsqueeze(0)

    def describe(self) -> dict[str, Any]:
        """Name, sizes and resolution, for reports."""
        return {
            "name": self.name,
            "train": len(self.train),  # type: ignore[arg-type]
            "test": len(self.test),  # type: ignore[arg-type]
            "classes": self.num_classes,
            "image_size": self.image_size,
        }


def digits_split(seed: int = 0, size: int = 32, train_size: int = 1200) -> dict[str, torch.Tensor]:
    """scikit-learn's digits as ``{"x_train", "y_train", "x_test", "y_test"}``: 3x``size``x``size`` normalised images.

    Example:
        >>> split = digits_split(size=16)
        >>> split["x_train"].shape, split["x_test"].shape
        (torch.Size([1200, 3, 16, 16]), torch.Size([597, 3, 16, 16]))
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, test = order[:train_size], order[train_size:]
    images = (images - images[train].mean()) / images[train].std()
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return {"x_train": images[train], "y_train": labels[train], "x_test": images[test], "y_test": labels[test]}


def _root(name: str, root: str | None) -> Path:
    if not root:
        raise ValueError(f"data={name} reads a dataset from disk: give its location, data.root=/path/to/{name}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ValueError(f"data.root={root!r} is not a directory")
    return path


def _imagefolder(root: str | None, image_size: int) -> tuple[Dataset, Dataset, int]:
    from torchvision import transforms

    base = _root("imagefolder", root)
    splits = [base / "train", next((base / s for s in ("val", "validation", "test") if (base / s).is_dir()), None)]
    if not splits[0].is_dir() or splits[1] is None:
        raise ValueError(
            f"data=imagefolder expects {base}/train/<class>/*.jpg and {base}/val/<class>/*.jpg (ImageNet layout)"
        )
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    test_tf = transforms.Compose(
        [
            transforms.Resize(round(image_size / 0.875)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    train, test = _image_folder(splits[0], train_tf), _image_folder(splits[1], test_tf)
    if train.classes != test.classes:
        raise ValueError(f"{splits[0]} and {splits[1]} hold different classes")
    return train, test, len(train.classes)


def _image_folder(split: Path, transform: Callable[..., Any]) -> Dataset:
    """torchvision's ``ImageFolder`` over ``split``; a class directory without images is named in one line."""
    from torchvision import datasets
    from torchvision.datasets.folder import IMG_EXTENSIONS

    try:
        return datasets.ImageFolder(str(split), transform=transform)
    except FileNotFoundError as error:  # torchvision's own message, raised as a bare traceback
        expected = f"image files ending in {', '.join(IMG_EXTENSIONS)}"
        classes = sorted(path for path in split.iterdir() if path.is_dir())
        if not classes:
            raise ValueError(
                f"data=imagefolder: {split} has no class directories; expected {split}/<class>/ holding {expected}"
            ) from error
        empty = [str(path) for path in classes if not _holds_images(path, IMG_EXTENSIONS)]
        more = f" (and {len(empty) - 3} more)" if len(empty) > 3 else ""
        where = ", ".join(empty[:3]) + more if empty else str(split)
        raise ValueError(f"data=imagefolder: no images in {where}; expected {expected}") from error


def _holds_images(directory: Path, extensions: tuple[str, ...]) -> bool:
    """Whether ``directory`` (searched recursively, as ``ImageFolder`` does) holds a file with an image extension."""
    return any(path.is_file() and path.name.lower().endswith(extensions) for path in directory.rglob("*"))


def _cifar10(root: str | None, image_size: int) -> tuple[Dataset, Dataset, int]:
    from torchvision import datasets, transforms

    base = _root("cifar10", root)
    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    resize = [transforms.Resize(image_size)] if image_size != 32 else []
    train_tf = transforms.Compose(
        [
            *resize,
            transforms.RandomCrop(image_size, padding=image_size // 8),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    test_tf = transforms.Compose([*resize, transforms.ToTensor(), normalize])
    try:
        train = datasets.CIFAR10(str(base), train=True, transform=train_tf, download=False)
        test = datasets.CIFAR10(str(base), train=False, transform=test_tf, download=False)
    except RuntimeError as error:
        raise ValueError(
            f"no CIFAR-10 under data.root={str(base)!r} ({error}); it must hold cifar-10-batches-py/ (nothing is "
            "downloaded)"
        ) from error
    return train, test, 10


def _digits(root: str | None, image_size: int, seed: int) -> tuple[Dataset, Dataset, int]:
    split = digits_split(seed, image_size)  # bundled with scikit-learn: no root
    return TensorDataset(split["x_train"], split["y_train"]), TensorDataset(split["x_test"], split["y_test"]), 10


_LOADERS: dict[str, Callable[[str | None, int, int], tuple[Dataset, Dataset, int]]] = {
    "digits": _digits,
    "imagefolder": lambda root, image_size, seed: _imagefolder(root, image_size),
    "cifar10": lambda root, image_size, seed: _cifar10(root, image_size),
}
"""Dataset name -> loader ``(root, image_size, seed) -> (train, test, classes)``; its keys are :data:`DATASETS`."""


def build_data(
    name: str,
    *,
    root: str | None = None,
    image_size: int = 64,
    batch_size: int = 64,
    num_workers: int = 0,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> ImageData:
    """Build the dataset ``name`` (one of :data:`DATASETS`) at ``image_size``.

    ``max_eval_samples`` keeps a seeded subset of the test split of at most that many images.

    Example:
        >>> data = build_data("digits", image_size=16)
        >>> data.num_classes, data.example_input().shape
        (10, torch.Size([1, 3, 16, 16]))
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {list(DATASETS)}")
    for key, value, minimum in (("image_size", image_size, 8), ("batch_size", batch_size, 1)):
        if value < minimum:
            raise ValueError(f"data.{key} must be >= {minimum}, got {value}")
    train, test, classes = _LOADERS[name](root, image_size, seed)
    if max_eval_samples is not None:
        if max_eval_samples < 1:
            raise ValueError(f"data.max_eval_samples must be >= 1, got {max_eval_samples}")
        count = min(max_eval_samples, len(test))  # type: ignore[arg-type]
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:count]  # type: ignore[arg-type]
        test = Subset(test, order.tolist())
    return ImageData(name, train, test, classes, image_size, batch_size, num_workers, seed)
