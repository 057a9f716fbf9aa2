"""A user-supplied ``.npz`` with x_train, y_train, x_test, y_test (uint8 NHWC images, integer
labels) and optionally class_names."""

from __future__ import annotations

import zipfile

import numpy as np

from ...atomic import load_arrays
from ...registry import SOURCES
from ..store import RawDataset
from . import Sizes, Source, existing_path

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def integer_labels(labels: np.ndarray, path, key: str) -> np.ndarray:
    """``labels`` as int64, refusing what a cast would change silently (NaN, 2.5, True)."""
    if np.issubdtype(labels.dtype, np.integer):
        return labels.astype(np.int64)
    fix = "store class indices 0, 1, ... as integers"
    if not np.issubdtype(labels.dtype, np.floating):
        raise ValueError(f"{path}: {key} has dtype {labels.dtype}, not integer class indices; {fix}")
    finite = np.isfinite(labels)
    if not finite.all():
        raise ValueError(f"{path}: {key} has {int((~finite).sum())} NaN or infinite label(s), first at index "
                         f"{int(np.flatnonzero(~finite)[0])}; {fix}")
    fractional = labels != np.round(labels)
    if fractional.any():
        first = int(np.flatnonzero(fractional)[0])
        raise ValueError(f"{path}: {key} has {int(fractional.sum())} fractional label(s), e.g. {labels[first]} at "
                         f"index {first}; {fix}")
    return labels.astype(np.int64)


def load_npz(options: dict) -> RawDataset:
    path = existing_path(options, "path")
    arrays = load_arrays(path, ".npz")
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"{path} lacks array(s) {', '.join(missing)}")
    y_train, y_test = (integer_labels(arrays[key], path, key) for key in ("y_train", "y_test"))
    if "class_names" in arrays:
        class_names = tuple(str(c) for c in arrays["class_names"])
    else:
        top = int(max(y_train.max(initial=0), y_test.max(initial=0)))
        class_names = tuple(str(c) for c in range(top + 1))
    return RawDataset(arrays["x_train"], y_train, arrays["x_test"], y_test, class_names)


def npz_sizes(options: dict) -> Sizes:
    """The labels are read (small), the images' shape from the array header only."""
    path = existing_path(options, "path")
    with zipfile.ZipFile(path) as archive, np.load(path) as arrays:
        with archive.open("x_train.npy") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            image_shape = read_header(handle)[0]
        y_train, y_test = arrays["y_train"], arrays["y_test"]
        classes = int(max(y_train.max(), y_test.max())) + 1
        return Sizes(len(y_train), len(y_test), classes, int(image_shape[1]))


SOURCES.register("npz", "a user-supplied .npz with x_train, y_train, x_test, y_test[, class_names]")(
    Source(load=load_npz, required=("path",), options=("path",), sizes=npz_sizes)
)
