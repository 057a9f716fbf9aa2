"""The offline demo dataset: scikit-learn's bundled handwritten digits (1,797 real 8x8 greyscale
scans, no download), upscaled bilinearly to an RGB image of ``image_size`` pixels."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...registry import SOURCES
from ..store import RawDataset
from . import Sizes, Source

TEST_FRACTION = 0.25
SPLIT_SEED = 0


def load_digits(options: dict) -> RawDataset:
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    size = int(options.get("image_size", 32))
    bunch = sklearn_digits()
    grey = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    upscaled = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    images = upscaled.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    images = images.permute(0, 2, 3, 1).contiguous().numpy()
    labels = bunch.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    train, test = np.sort(train), np.sort(test)
    return RawDataset(images[train], labels[train], images[test], labels[test],
                      tuple(str(d) for d in range(10)))


def digits_sizes(options: dict) -> Sizes:
    """scikit-learn's 1,797 scans, TEST_FRACTION held out (rounded up, as train_test_split does)."""
    test = int(np.ceil(1797 * TEST_FRACTION))
    return Sizes(1797 - test, test, 10, int(options.get("image_size", 32)))


SOURCES.register("digits", "scikit-learn's bundled handwritten digits, upscaled RGB (offline demo)")(
    Source(load=load_digits, options=("image_size",), sizes=digits_sizes)
)
