"""Write files so that they appear complete or not at all: temporary name in the same
directory, flush + fsync, then an atomic rename. Read them back with errors that name the file
and say how to get a good one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """An uncompressed .npz, as ``np.savez`` writes, but with fixed member timestamps: equal arrays
    give equal bytes (run fingerprints hash their input files' contents)."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)


# What to do about a damaged file the workflow wrote: every output is remade when it is missing.
REMAKE = "delete it and run the same snakemake command again, which remakes it (and what depends on it)"


def file_digest(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a file's bytes (None for no file): what runs and checkpoints compare, so that an
    input rewritten with equal bytes, or a results directory copied, invalidates nothing."""
    if path is None:
        return None
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"corrupt JSON file {path}: {error}") from None


def read_arrays(path: str | os.PathLike, kind: str = "array") -> np.ndarray | dict[str, np.ndarray]:
    """A .npy array, or all arrays of an .npz file, read eagerly; errors name the path."""
    import zipfile

    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {key: loaded[key] for key in loaded.files}
        return loaded
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {kind} file: {path}") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise ValueError(f"corrupt {kind} file {path}: {error}; {REMAKE}") from None


def check_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray], kind: str,
                 ranges: dict[str, tuple[float, float]] | None = None) -> dict[str, np.ndarray]:
    """``arrays`` of ``path`` as read, after checking what would otherwise be cast silently:
    floating arrays hold only finite values; arrays named ``*images`` are uint8; ``*labels`` and
    ``*indices`` are non-negative integers; an array named in ``ranges`` lies within its
    (low, high). Errors name the file, the array and the fix."""
    for key, array in arrays.items():
        problem = None
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            problem = f"{int(np.size(array) - np.isfinite(array).sum())} NaN or infinite value(s)"
        elif key.endswith("images") and array.dtype != np.uint8:
            problem = f"dtype {array.dtype}, not uint8 pixel values"
        elif key.endswith(("labels", "indices")) and not np.issubdtype(array.dtype, np.integer):
            problem = f"dtype {array.dtype}, not integers"
        elif key.endswith(("labels", "indices")) and array.size and array.min() < 0:
            problem = f"negative entries (minimum {array.min()})"
        elif ranges and key in ranges and array.size and not (
                ranges[key][0] <= array.min() and array.max() <= ranges[key][1]):
            problem = f"values in [{array.min()}, {array.max()}], outside [{ranges[key][0]}, {ranges[key][1]}]"
        if problem:
            raise ValueError(f"{kind} file {path}: array {key!r} has {problem}; {REMAKE}")
    return arrays


def read_npy(path: str | os.PathLike, kind: str = "array") -> np.ndarray:
    array = read_arrays(path, kind)
    if isinstance(array, dict):
        raise ValueError(f"corrupt {kind} file {path}: an .npz archive, not a single array")
    return array


def load_arrays(path: str | os.PathLike, kind: str = "array") -> dict[str, np.ndarray]:
    arrays = read_arrays(path, kind)
    if not isinstance(arrays, dict):
        raise ValueError(f"corrupt {kind} file {path}: a single array, not an .npz archive")
    return arrays
