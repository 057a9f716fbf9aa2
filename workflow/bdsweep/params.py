"""Hyperparameters: each method declares a frozen dataclass of its defaults; configuration
overrides any subset. Unknown keys and wrong types are errors that name the method and key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any


def _coerce(owner: str, key: str, kind: Any, value: Any) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # ``X | None``: None or an X
        options = [option for option in typing.get_args(kind) if option is not type(None)]
        if value is None and len(options) < len(typing.get_args(kind)):
            return None
        if len(options) == 1:
            return _coerce(owner, key, options[0], value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    expected = typing.get_origin(kind) or kind
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise TypeError(f"{owner}: hyperparameter {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def resolve(params_class: type, overrides: dict | None, owner: str):
    """Return ``params_class`` with ``overrides`` applied, checking names and types."""
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(params_class)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise KeyError(f"{owner} has no hyperparameter {', '.join(map(repr, unknown))}; "
                       f"it has: {', '.join(fields) or '(none)'}")
    hints = typing.get_type_hints(params_class)
    values = {key: _coerce(owner, key, hints[key], value) for key, value in overrides.items()}
    return params_class(**values)


def scale_batch_sizes(params, percent: int):
    """``params`` with every ``batch_size`` / ``*_batch_size`` hyperparameter scaled to ``percent``
    (at least 1): how a run retried after running out of GPU memory asks for less of it."""
    names = [f.name for f in dataclasses.fields(params) if f.name == "batch_size" or f.name.endswith("_batch_size")]
    scaled = {name: max(1, getattr(params, name) * percent // 100) for name in names
              if isinstance(getattr(params, name), int)}
    return dataclasses.replace(params, **scaled)


def check_ranges(owner: str, params, checks: dict[str, bool]) -> None:
    """Raise for the first hyperparameter whose check failed, naming it and its value
    (for ``__post_init__`` of parameter classes: ``{"lr": self.lr > 0, ...}``)."""
    for name, valid in checks.items():
        if not valid:
            raise ValueError(f"{owner} hyperparameter {name!r} is out of range: {getattr(params, name)!r}")


def as_dict(params) -> dict:
    return {key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(params).items()}


def stable_hash(obj) -> str:
    """Short digest of a JSON-able object, independent of key order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stable_seed(*parts) -> int:
    """A 63-bit seed derived from names and numbers, equal across processes and machines."""
    return int(stable_hash([str(p) for p in parts]), 16) & (2**63 - 1)


@dataclasses.dataclass(frozen=True)
class NoParams:
    """For methods without hyperparameters."""
