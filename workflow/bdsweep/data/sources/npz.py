"""A user-supplied ``.npz`` with x_train, y_train, x_test, y_test (uint8 NHWC images, integer
labels) and optionally class_names."""

from __future__ import annotations

import numpy as np

from ...atomic import load_arrays
from ...registry import SOURCES
from ..store import RawDataset
from . import Source, existing_path

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(options: dict) -> RawDataset:
    path = existing_path(options, "path")
    arrays = load_arrays(path, ".npz")
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"{path} lacks array(s) {', '.join(missing)}")
    if "class_names" in arrays:
        class_names = tuple(str(c) for c in arrays["class_names"])
    else:
        top = int(max(arrays["y_train"].max(), arrays["y_test"].max()))
        class_names = tuple(str(c) for c in range(top + 1))
    return RawDataset(arrays["x_train"], arrays["y_train"].astype(np.int64),
                      arrays["x_test"], arrays["y_test"].astype(np.int64), class_names)


SOURCES.register("npz", "a user-supplied .npz with x_train, y_train, x_test, y_test[, class_names]")(
    Source(load=load_npz, required=("path",), options=("path",))
)
