"""Dataset sources, one module each, registered in ``bdsweep.registry.SOURCES``.

A source turns its configured options (``root``, ``path``, ``download``, ``image_size``) into a
``RawDataset``. It names the options it needs and its default normalisation and flip policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..store import RawDataset

NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class Source:
    load: Callable[[dict], RawDataset]
    required: tuple[str, ...] = ()
    mean: tuple[float, float, float] = NO_NORMALISATION[0]
    std: tuple[float, float, float] = NO_NORMALISATION[1]
    hflip: bool = False
    options: tuple[str, ...] = field(default=())


def existing_path(options: dict, key: str) -> Path:
    path = Path(options[key]).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {key} does not exist: {path}")
    return path
