"""Modules imported on first use.

Snakemake imports bdsweep to plan (figure and table names, captions, code digests), on every
invocation and again in every cluster job; the plotting and statistics libraries cost seconds
there and are needed only when a figure or table is actually drawn."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType


class LazyModule(ModuleType):
    """Stands for module ``name``; the first attribute read imports it (after ``before()``)."""

    def __init__(self, name: str, before: Callable[[], None] | None = None):
        super().__init__(name)
        self._before = before
        self._module = None

    def __getattr__(self, attribute: str):
        if self._module is None:
            if self._before is not None:
                self._before()
            self._module = importlib.import_module(self.__name__)
        return getattr(self._module, attribute)


def headless_matplotlib() -> None:
    import matplotlib

    matplotlib.use("Agg")  # figures are files; no display
