"""CIFAR-10 and GTSRB through torchvision (downloaded into ``root`` when ``download`` is true).

GTSRB images come in many sizes; like the survey's toolkit, each whole image is resized to
32x32 with bilinear interpolation (no cropping to the sign's bounding box)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...registry import SOURCES
from ..store import RawDataset
from . import Sizes, Source

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)
GTSRB_SIZE = 32
GTSRB_CLASSES = 43


def _open(factory, options: dict, **kwargs):
    root = Path(options["root"]).expanduser()
    download = bool(options.get("download", False))
    if not download and not root.exists():
        raise FileNotFoundError(f"dataset root does not exist: {root} (set download: true to fetch it)")
    try:
        return factory(root=str(root), download=download, **kwargs)
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(f"no usable dataset under {root}: {error}") from None


def load_cifar10(options: dict) -> RawDataset:
    from torchvision.datasets import CIFAR10

    train, test = (_open(CIFAR10, options, train=flag) for flag in (True, False))
    return RawDataset(
        np.asarray(train.data, dtype=np.uint8), np.asarray(train.targets, dtype=np.int64),
        np.asarray(test.data, dtype=np.uint8), np.asarray(test.targets, dtype=np.int64),
        tuple(train.classes),
    )


def _gtsrb_split(dataset) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = [], []
    for path, label in dataset._samples:
        # Training folders are named by class id; torchvision numbers the folders it finds.
        folder = Path(path).parent.name
        label = int(folder) if folder.isdigit() else label
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((GTSRB_SIZE, GTSRB_SIZE), Image.BILINEAR)
            images.append(np.asarray(resized, dtype=np.uint8))
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_gtsrb(options: dict) -> RawDataset:
    from torchvision.datasets import GTSRB

    x_train, y_train = _gtsrb_split(_open(GTSRB, options, split="train"))
    x_test, y_test = _gtsrb_split(_open(GTSRB, options, split="test"))
    return RawDataset(x_train, y_train, x_test, y_test, tuple(str(c) for c in range(GTSRB_CLASSES)))


SOURCES.register("cifar10", "CIFAR-10 via torchvision (32 px, 10 classes)")(
    Source(load=load_cifar10, required=("root",), options=("root", "download"),
           mean=CIFAR10_MEAN, std=CIFAR10_STD, hflip=True, sizes=lambda options: Sizes(50_000, 10_000, 10, 32))
)
SOURCES.register("gtsrb", "GTSRB via torchvision, whole image resized to 32 px bilinear (43 classes)")(
    Source(load=load_gtsrb, required=("root",), options=("root", "download"),
           sizes=lambda options: Sizes(26_640, 12_630, GTSRB_CLASSES, GTSRB_SIZE))  # torchvision's splits
)
