"""Name -> implementation registries.

Every attack, architecture, defense and dataset source is one module that registers itself
under the name the configuration uses. Importing a kind's package (e.g. ``bdsweep.defenses``)
imports all of its modules, so the registry is complete before anything is looked up.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class UnknownNameError(KeyError):
    """A configured name that no module registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    description: str
    facts: dict = field(default_factory=dict)  # what planning needs to know about it, e.g. forward_gflops


class Registry:
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self._package = package
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, description: str, **facts) -> Callable:
        """Register ``obj`` as ``name``; ``facts`` are what other parts need to know about it without
        building it (e.g. an architecture's ``forward_gflops`` per image size, for ``bdsweep cost``)."""

        def decorate(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, description, dict(facts))
            return obj

        return decorate

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            package = importlib.import_module(self._package)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self._package}.{module.name}")

    def entries(self) -> list[Entry]:
        self._load()
        return sorted(self._entries.values(), key=lambda e: e.name)

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def entry(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            known = ", ".join(self.names())
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._entries[name]

    def get(self, name: str) -> Any:
        return self.entry(name).obj


def smoke_settings(kind: str, name: str, params: type, smoke: dict | None) -> dict:
    """A method's ``smoke`` settings, checked: for tests only, the hyperparameter overrides that make
    one run take well under a second on a tiny model (tests/test_contract.py); every key must be a
    field of its ``params`` dataclass."""
    import dataclasses

    smoke = dict(smoke or {})
    if smoke and (unknown := set(smoke) - {f.name for f in dataclasses.fields(params)}):
        raise ValueError(f"{kind} {name!r}: smoke names no hyperparameter {sorted(unknown)}")
    return smoke


ATTACKS = Registry("attack", "bdsweep.attacks")
ARCHITECTURES = Registry("architecture", "bdsweep.models")
DEFENSES = Registry("defense", "bdsweep.defenses")
SOURCES = Registry("dataset source", "bdsweep.data.sources")
