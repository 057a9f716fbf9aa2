"""Training checkpoints: the whole state of a training loop, saved atomically every few epochs and
when SLURM preempts the job (SIGTERM), so that a rerun resumes where the job stopped and reaches
the same weights as an uninterrupted run.

A defense is checkpointed by phases (:func:`defense_checkpoints`): every ``engine.train`` call and
every own loop that opts in (:func:`loop_checkpoint`) is the next phase of one checkpoint file. A
rerun replays the defense from its start; a finished phase restores its final state at once, the
interrupted one resumes, and so the replay reaches the state of an uninterrupted run.

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
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path, file_digest
from .errors import Preempted

# Snakemake deletes a job's log before every attempt (a retry, or a SLURM requeue), so the events
# that explain an attempt (its start, a preemption, a resume, running out of memory) are also
# appended to the file this variable names: the rules set it to ``<log>.history``.
HISTORY_VARIABLE = "BDSWEEP_HISTORY"


def trace(message: str) -> None:
    """Print ``message`` to the job's log (stderr) and append it to the job's history, if any."""
    print(message, file=sys.stderr, flush=True)
    history = os.environ.get(HISTORY_VARIABLE)
    if history:
        try:
            with open(history, "a") as handle:  # one short write: lines of parallel workers stay whole
                handle.write(message.rstrip("\n") + "\n")
        except OSError as error:  # a trace must never fail the job
            print(f"bdsweep: cannot append to {history}: {error}", file=sys.stderr)


def fingerprint(arguments: dict, files: list[str | os.PathLike] = ()) -> str:
    """A hash of a job's arguments and of its input files' contents: an input rewritten with equal
    bytes (a poison file redrawn, a results directory copied) keeps the checkpoint, as it keeps a
    defense run (``runs.up_to_date``). Hashing costs about a second per GB, once per job."""
    digests = [(str(path), file_digest(path)) for path in files]
    blob = json.dumps({"arguments": arguments, "files": digests}, sort_keys=True, default=str)
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


def _is_numbers(value) -> bool:
    """A number, or a list or string-keyed dict of numbers (per-epoch records, last-round summaries)."""
    if isinstance(value, list):
        return all(isinstance(item, (bool, int, float)) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and isinstance(item, (bool, int, float)) for key, item in value.items())
    return isinstance(value, (bool, int, float))


def _is_tensors(value) -> bool:
    """A non-empty list or string-keyed dict of tensors (masks per layer, bounds per stage)."""
    if isinstance(value, list):
        return bool(value) and all(isinstance(item, torch.Tensor) for item in value)
    if isinstance(value, dict):
        return bool(value) and all(isinstance(key, str) and isinstance(item, torch.Tensor)
                                   for key, item in value.items())
    return False


def object_state(obj, tensor_collections: bool = False) -> dict:
    """The resumable state of an object's attributes: modules, optimisers and schedulers through
    their state dicts, random generators through their states, tensors (accumulators, masks),
    numbers and lists or dicts of numbers (per-epoch records) as they are. With
    ``tensor_collections``, also lists and string-keyed dicts of tensors (masks per layer): an
    object that holds only state asks for them; a training hook does not, as its dicts of tensors
    are per-batch buffers (layer outputs) that a checkpoint need not carry."""
    state = {}
    for name, value in vars(obj).items():
        if isinstance(value, (nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
            state[name] = value.state_dict()
        elif isinstance(value, torch.Generator):
            state[name] = value.get_state()
        elif isinstance(value, torch.Tensor):
            state[name] = value.detach()
        elif tensor_collections and _is_tensors(value):
            state[name] = ({key: tensor.detach() for key, tensor in value.items()} if isinstance(value, dict)
                           else [tensor.detach() for tensor in value])
        elif _is_numbers(value):
            state[name] = value
    return state


def _restored_tensor(value, saved: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """``saved`` copied into ``value`` where it is a tensor of the same shape and dtype (so whatever
    refers to it sees the restored values), else ``saved`` on ``value``'s device or ``device``."""
    if isinstance(value, torch.Tensor):
        if value.shape == saved.shape and value.dtype == saved.dtype:
            with torch.no_grad():
                value.copy_(saved)
            return value
        return saved.to(value.device)
    return saved if device is None else saved.to(device)


def load_object_state(obj, state: dict, device: torch.device | None = None) -> None:
    """Put back what :func:`object_state` captured. Tensors, also those in lists and dicts, are
    copied into the existing ones where shapes agree, so whatever refers to them (an optimiser, a
    closure) sees the restored values; a tensor in place of a non-tensor (an attribute set lazily,
    e.g. an accumulator that starts as None) goes to ``device``."""
    for name, saved in state.items():
        value = getattr(obj, name, None)  # None: set only after the object was made
        if isinstance(value, (nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
            value.load_state_dict(saved)
        elif isinstance(value, torch.Generator):
            value.set_state(saved)
        elif isinstance(saved, torch.Tensor):
            setattr(obj, name, _restored_tensor(value, saved, device))
        elif isinstance(saved, dict) and _is_tensors(saved):
            current = value if isinstance(value, dict) else {}
            setattr(obj, name, {key: _restored_tensor(current.get(key), tensor, device)
                                for key, tensor in saved.items()})
        elif isinstance(saved, list) and _is_tensors(saved):
            current = value if isinstance(value, list) and len(value) == len(saved) else [None] * len(saved)
            setattr(obj, name, [_restored_tensor(old, tensor, device) for old, tensor in zip(current, saved)])
        else:
            setattr(obj, name, type(saved)(saved) if isinstance(saved, (list, dict)) else saved)


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


def _detached_copy(state):
    """A CPU copy of a nested state: state dicts hold the live tensors, which later phases change."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: _detached_copy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_detached_copy(value) for value in state)
    return state


class DefenseSession:
    """The phases of one defense run, kept in one checkpoint file: {phase number: (label, state)}."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        saved = checkpoint.load()
        self.phases: dict[int, dict] = dict(saved["phases"]) if saved and "phases" in saved else {}
        self.next_phase = 0
        # What the checkpoint held when the run started: a resumed run records where it resumed.
        self.resumed_from = None
        if self.phases:
            last = max(self.phases)
            self.resumed_from = {"phase": last, "label": self.phases[last]["label"], "saved_phases": len(self.phases)}
            trace(f"bdsweep: resuming from {checkpoint.path}: phase {last} ({self.phases[last]['label']}), "
                  f"{len(self.phases)} phase(s) saved")

    def phase(self, label: str) -> PhaseCheckpoint:
        number, self.next_phase = self.next_phase, self.next_phase + 1
        return PhaseCheckpoint(self, number, label)

    def save(self, number: int, label: str, state: dict) -> None:
        self.phases[number] = {"label": label, "state": _detached_copy(state)}
        self.checkpoint.save({"phases": self.phases})


@dataclass(frozen=True)
class PhaseCheckpoint:
    """One phase's part of a defense checkpoint, with the interface of :class:`Checkpoint` that
    ``engine.train`` uses (``load``, ``save``, ``path``)."""

    session: DefenseSession
    number: int
    label: str

    @property
    def path(self) -> Path:
        return self.session.checkpoint.path

    def load(self) -> dict | None:
        saved = self.session.phases.get(self.number)
        if saved is None:
            return None
        if saved["label"] != self.label:  # the defense's code changed between the runs
            print(f"bdsweep: ignoring phase {self.number} of {self.path}: it was {saved['label']!r}, "
                  f"now {self.label!r}", file=sys.stderr)
            return None
        return saved["state"]

    def save(self, state: dict) -> None:
        self.session.save(self.number, self.label, state)


_active_session: ContextVar[DefenseSession | None] = ContextVar("bdsweep_defense_session", default=None)


def _stop_between_checkpoints(signum, frame):
    raise Preempted("stopped by SIGTERM outside a checkpointed loop; the rerun resumes from the last "
                    "checkpointed phase")


@contextmanager
def defense_checkpoints(checkpoint: Checkpoint) -> Iterator[DefenseSession]:
    """While active, every ``engine.train`` call without its own checkpoint, and every
    :func:`loop_checkpoint`, is the next phase of ``checkpoint``. SIGTERM inside a phase saves it
    and raises :class:`Preempted` after the current step; elsewhere (code between phases, or an
    own loop that does not checkpoint) it raises :class:`Preempted` at once, and the rerun
    repeats that part."""
    session = DefenseSession(checkpoint)
    token = _active_session.set(session)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_between_checkpoints) if main_thread else None
    try:
        yield session
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        _active_session.reset(token)


def defense_phase(label: str) -> PhaseCheckpoint | None:
    """The next phase of the active defense checkpoint; None outside :func:`defense_checkpoints`."""
    session = _active_session.get()
    return None if session is None else session.phase(label)


class LoopCheckpoint:
    """An own optimisation loop's phase of the defense checkpoint (see :func:`loop_checkpoint`)."""

    def __init__(self, phase: PhaseCheckpoint | None, progress, preempted: Callable[[], bool]):
        self.phase, self.progress, self.preempted = phase, progress, preempted

    def boundary(self, finished: bool = False) -> None:
        """Call where the loop's state is whole (after an iteration). Saves it when the loop has
        finished (so a replay restores it at once) or SIGTERM has arrived; then stops on SIGTERM."""
        if self.phase is None:
            return
        stop = self.preempted()
        if finished or stop:
            self.phase.save({"progress": object_state(self.progress, tensor_collections=True),
                             "global_rng": global_rng_state()})
        if stop:
            raise Preempted(f"stopped by SIGTERM in {self.phase.label}; resume from {self.phase.path}")


@contextmanager
def loop_checkpoint(label: str, progress) -> Iterator[LoopCheckpoint]:
    """Make an own loop a phase of the active defense checkpoint. ``progress`` is an object holding
    everything the loop changes (see :func:`object_state`: modules, optimisers, generators, tensors
    and lists or dicts of them, numbers, lists or dicts of numbers, e.g. the iteration count); a
    saved phase is put back into it on entry. The loop calls ``boundary()`` after each iteration.
    Outside a defense checkpoint this does nothing, and the loop runs as it would without it."""
    phase = defense_phase(label)
    if phase is None:
        yield LoopCheckpoint(None, progress, lambda: False)
        return
    if (saved := phase.load()) is not None:
        missing = sorted(set(object_state(progress, tensor_collections=True)) - set(saved["progress"]))
        if missing:  # saved by other code: restoring the rest would resume from a wrong step
            print(f"bdsweep: ignoring phase {phase.number} of {phase.path}: it holds no {', '.join(missing)}",
                  file=sys.stderr)
        else:
            load_object_state(progress, saved["progress"])
            set_global_rng_state(saved["global_rng"])
    with sigterm_requests() as preempted:
        yield LoopCheckpoint(phase, progress, preempted)


class LoopState:
    """Everything an own loop changes, as the attributes given by keyword (modules, optimisers,
    generators, tensors and lists or dicts of them, numbers, records: see :func:`object_state`; the
    loop's own objects, so a resumed run restores them in place), plus ``step``, the steps finished,
    and ``stopped``, whether the loop ended early: what :func:`checkpointed_steps` saves."""

    def __init__(self, **state):
        self.step, self.stopped = 0, False
        vars(self).update(state)


def checkpointed_steps(label: str, state: LoopState, steps: int,
                       stop_early: Callable[[], bool] | None = None) -> Iterator[int]:
    """``for step in checkpointed_steps(label, state, steps): ...`` runs an own loop as a phase of the
    defense checkpoint (:func:`loop_checkpoint`). Yields the indices of the steps left (from
    ``state.step``: 0, or where a resumed run stopped); after each step's body counts it in
    ``state.step``, asks ``stop_early()`` whether the loop ends before ``steps``, and calls the
    boundary, which saves ``state`` once the loop is done (a replay then runs no step) or SIGTERM has
    arrived (and then stops). Run the loop to its end, without ``break``: an early end goes through
    ``stop_early``, so that it is saved."""
    with loop_checkpoint(label, state) as checkpoint:
        while state.step < steps and not state.stopped:
            yield state.step
            state.step += 1
            state.stopped = stop_early is not None and bool(stop_early())
            checkpoint.boundary(finished=state.step == steps or state.stopped)
