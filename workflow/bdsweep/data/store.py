"""The canonical on-disk form of a dataset and its memory-mapped loader.

A prepared dataset is a directory holding ``x_train.npy``, ``y_train.npy``, ``x_test.npy``,
``y_test.npy`` (uint8 NHWC images, int64 labels) and ``meta.json`` (class names, image size,
normalisation, whether horizontal flips are label-preserving). Arrays load memory-mapped, so a
stage that needs 20 images of a 100k-image dataset reads 20 images.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import read_json, write_json, write_npy

ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")
FILES = (*[f"{name}.npy" for name in ARRAY_NAMES], "meta.json")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class RawDataset:
    """What a source returns, before it is checked and written."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]


def check_raw(raw: RawDataset, origin: str) -> None:
    """Reject arrays that are not square uint8 RGB images with labels in range."""
    for split in ("train", "test"):
        x, y = getattr(raw, f"x_{split}"), getattr(raw, f"y_{split}")
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3 or x.shape[1] != x.shape[2]:
            raise ValueError(f"{origin}: x_{split} must be uint8 NHWC RGB square images, got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{origin}: y_{split} must be 1-D with {len(x)} labels, got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):  # a cast would turn NaN or 2.5 into some class silently
            raise ValueError(f"{origin}: y_{split} must hold integer class indices, got dtype {y.dtype}")
        if len(y) and (y.min() < 0 or y.max() >= len(raw.class_names)):
            raise ValueError(f"{origin}: y_{split} has labels outside 0..{len(raw.class_names) - 1}")
    if raw.x_train.shape[1:] != raw.x_test.shape[1:]:
        raise ValueError(f"{origin}: train and test images differ in shape")


def write_dataset(directory: str | os.PathLike, raw: RawDataset, name: str, mean, std, hflip: bool) -> None:
    check_raw(raw, name)
    directory = Path(directory)
    for array_name in ARRAY_NAMES:
        array = getattr(raw, array_name)
        dtype = np.uint8 if array_name.startswith("x") else np.int64
        write_npy(directory / f"{array_name}.npy", np.ascontiguousarray(array, dtype=dtype))
    info = DatasetInfo(
        name=name,
        num_classes=len(raw.class_names),
        image_size=int(raw.x_train.shape[1]),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        hflip=bool(hflip),
        class_names=tuple(str(c) for c in raw.class_names),
    )
    # meta.json last: its presence marks the directory complete.
    write_json(directory / "meta.json", asdict(info))


class PreparedDataset:
    """Memory-mapped view of a prepared dataset directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta = read_json(self.directory / "meta.json")
        try:
            self.info = DatasetInfo(**{**meta, "mean": tuple(meta["mean"]), "std": tuple(meta["std"]),
                                       "class_names": tuple(meta["class_names"])})
        except (TypeError, KeyError) as error:
            raise ValueError(f"corrupt dataset metadata {self.directory / 'meta.json'}: {error}") from None
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            path = self.directory / f"{name}.npy"
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise FileNotFoundError(f"missing dataset array: {path}") from None
            except ValueError as error:
                raise ValueError(f"corrupt dataset array {path}: {error}") from None
            self._arrays[name] = array
        return self._arrays[name]

    @property
    def x_train(self) -> np.ndarray:
        return self.array("x_train")

    @property
    def y_train(self) -> np.ndarray:
        return self.array("y_train")

    @property
    def x_test(self) -> np.ndarray:
        return self.array("x_test")

    @property
    def y_test(self) -> np.ndarray:
        return self.array("y_test")
