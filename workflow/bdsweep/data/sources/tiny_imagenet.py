"""Tiny-ImageNet from its official folder layout (the extracted ``tiny-imagenet-200`` zip):
``train/<wnid>/images/*.JPEG`` and ``val/images`` with ``val/val_annotations.txt``. The official
validation split is the test set; a label is the wnid's index among the sorted training wnids;
greyscale images are converted to RGB. With ``download: true`` a missing root is fetched from the
official address and extracted (``root`` names the extracted ``tiny-imagenet-200`` folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...registry import SOURCES
from ..store import RawDataset
from . import Sizes, Source, existing_path

TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2302, 0.2265, 0.2262)
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _decode(paths: list[Path]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"corrupt image {path}: {error}") from None
    if len({image.shape for image in images}) > 1:
        raise ValueError(f"images under {paths[0].parent.parent} differ in size")
    return np.stack(images)


def _class_names(root: Path, wnids: list[str]) -> tuple[str, ...]:
    words = root / "words.txt"
    if not words.exists():
        return tuple(wnids)
    names = dict(line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line)
    return tuple(names.get(wnid, wnid).strip() for wnid in wnids)


def download(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(URL, download_root=str(root.parent))
    if not root.exists():
        raise FileNotFoundError(f"downloaded {URL}, but it did not extract to {root}")


def load_tiny_imagenet(options: dict) -> RawDataset:
    if options.get("download") and not Path(options["root"]).expanduser().exists():
        download(Path(options["root"]).expanduser())
    root = existing_path(options, "root")
    train_dir, annotations = root / "train", root / "val" / "val_annotations.txt"
    for required in (train_dir, annotations):
        if not required.exists():
            raise FileNotFoundError(f"Tiny-ImageNet layout incomplete, missing: {required}")
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    index = {wnid: i for i, wnid in enumerate(wnids)}

    train_paths, train_labels = [], []
    for wnid in wnids:
        files = sorted((train_dir / wnid / "images").glob("*.JPEG"))
        train_paths += files
        train_labels += [index[wnid]] * len(files)

    test_paths, test_labels = [], []
    for line_number, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise ValueError(f"{annotations}:{line_number}: unexpected line {line!r}")
        test_paths.append(root / "val" / "images" / fields[0])
        test_labels.append(index[fields[1]])

    return RawDataset(
        _decode(train_paths), np.asarray(train_labels, dtype=np.int64),
        _decode(test_paths), np.asarray(test_labels, dtype=np.int64),
        _class_names(root, wnids),
    )


SOURCES.register("tiny-imagenet", "Tiny-ImageNet official folder layout (64 px, 200 classes; test = val)")(
    Source(load=load_tiny_imagenet, required=("root",), options=("root", "download"), mean=TINY_MEAN, std=TINY_STD,
           sizes=lambda options: Sizes(100_000, 10_000, 200, 64))  # test = the official val
)
