"""Training checkpoints: the whole state of a training loop, saved atomically every few epochs and
when SLURM preempts the job (SIGTERM), so that a rerun resumes where the job stopped and reaches
the same weights as an uninterrupted run.

A checkpoint is tied to its job by a fingerprint of everything the training depends on (arguments
and input files); one left over from another job, or one that cannot be read, is ignored with a
warning and training starts over: a checkpoint is a cache, never an input. Files load with
``torch.load(weights_only=True)``, so reading one never executes code.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a job killed by SIGTERM would report


class Preempted(Exception):
    """SIGTERM arrived during training; the checkpoint holds the state to resume from."""


RETRY_EXIT_CODE = 75  # EX_TEMPFAIL: the job failed for a reason its retry can avoid


class RetryWithLess(Exception):
    """The device ran out of memory: no result was written; a retry with smaller batches may pass."""


def fingerprint(arguments: dict, files: list[str | os.PathLike] = ()) -> str:
    """A hash of a job's arguments and of its input files' sizes and modification times."""
    stats = [(str(path), os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in files]
    blob = json.dumps({"arguments": arguments, "files": stats}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """Where a training loop keeps its checkpoint, which job it belongs to, and how often
    (every ``every`` epochs, on SIGTERM, and once training is done until the job's outputs exist)."""

    path: Path
    fingerprint: str
    every: int = 5

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # a cache: any unreadable file means "start over"
            print(f"bdsweep: ignoring unreadable checkpoint {self.path}: {error}", file=sys.stderr)
            return None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            print(f"bdsweep: ignoring checkpoint {self.path} of a different job", file=sys.stderr)
            return None
        return state

    def save(self, state: dict) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def object_state(obj) -> dict:
    """The resumable state of an object's attributes: modules, optimisers and schedulers through
    their state dicts, random generators through their states, numbers as they are."""
    state = {}
    for name, value in vars(obj).items():
        if isinstance(value, (nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
            state[name] = value.state_dict()
        elif isinstance(value, torch.Generator):
            state[name] = value.get_state()
        elif isinstance(value, (bool, int, float)):
            state[name] = value
    return state


def load_object_state(obj, state: dict) -> None:
    """Put back what :func:`object_state` captured."""
    for name, saved in state.items():
        value = getattr(obj, name)
        if isinstance(value, (nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
            value.load_state_dict(saved)
        elif isinstance(value, torch.Generator):
            value.set_state(saved)
        else:
            setattr(obj, name, saved)


def global_rng_state() -> dict:
    """The global generators dropout and stochastic depth draw from."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def sigterm_requests() -> Iterator[Callable[[], bool]]:
    """While active, SIGTERM asks the loop to checkpoint and stop instead of killing the process.
    Yields a function telling whether it has arrived. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    received = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
    try:
        yield received.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)
