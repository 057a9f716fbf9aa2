"""Dataset sources, one module each, registered in ``bdsweep.registry.SOURCES``.

A source turns its configured options (``root``, ``path``, ``download``, ``image_size``) into a
``RawDataset``. It names the options it needs, its default normalisation and flip policy, and its
sizes without loading it (``sizes``: what ``bdsweep cost`` prices a campaign with).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..store import RawDataset

NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class Sizes:
    """A prepared dataset's sizes, known before it is prepared."""

    train: int  # training images
    test: int  # test images
    classes: int
    size: int  # pixels per side


@dataclass(frozen=True)
class Source:
    load: Callable[[dict], RawDataset]
    required: tuple[str, ...] = ()
    mean: tuple[float, float, float] = NO_NORMALISATION[0]
    std: tuple[float, float, float] = NO_NORMALISATION[1]
    hflip: bool = False
    options: tuple[str, ...] = field(default=())
    sizes: Callable[[dict], Sizes] | None = None  # from the options alone (None: not priced by `bdsweep cost`)


def existing_path(options: dict, key: str) -> Path:
    path = Path(options[key]).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {key} does not exist: {path}")
    return path
