"""Hyperparameters: each method declares a frozen dataclass of its defaults; configuration
overrides any subset. Unknown keys and wrong types are errors that name the method and key.

A batch size is declared by its type, not guessed from its name: ``BatchSize`` for the images a step
holds in device memory (an out-of-memory retry scales it, :func:`scale_batch_sizes`), ``FixedBatchSize``
for one that is part of the method's result (BNP's loader batch, whose last batch gives the
statistics), which a retry leaves alone. Both are plain ``int`` to configuration and ``resolve``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Annotated, Any

_SCALED, _FIXED = "batch size: scaled on an out-of-memory retry", "batch size: part of the result"
BatchSize = Annotated[int, _SCALED]
FixedBatchSize = Annotated[int, _FIXED]


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


def batch_size_fields(params_class: type, kind: Any = BatchSize) -> tuple[str, ...]:
    """Names of the hyperparameters of ``params_class`` declared as ``kind`` (``BatchSize`` or
    ``FixedBatchSize``), in field order; a subclass redeclaring a field redeclares its kind too."""
    hints = typing.get_type_hints(params_class, include_extras=True)
    marker = typing.get_args(kind)[1]
    return tuple(f.name for f in dataclasses.fields(params_class)
                 if typing.get_origin(hints[f.name]) is Annotated and marker in hints[f.name].__metadata__)


def scale_batch_sizes(params, percent: int):
    """``params`` with every ``BatchSize`` hyperparameter scaled to ``percent`` (at least 1): how a run
    retried after running out of GPU memory asks for less of it."""
    return dataclasses.replace(params, **{name: max(1, getattr(params, name) * percent // 100)
                                          for name in batch_size_fields(type(params))})


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


def input_file(default: str = "") -> dataclasses.Field:
    """A hyperparameter naming an input file (a pattern or key image): declared, so that planning
    (``bdsweep cost``) can price a configuration whose file is not there yet."""
    return dataclasses.field(default=default, metadata={"input_file": True})


def input_file_fields(params_class: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(params_class) if f.metadata.get("input_file"))


@dataclasses.dataclass(frozen=True)
class NoParams:
    """For methods without hyperparameters."""
