"""One defense run: what it reads, what makes it up to date, and how it is computed and recorded.

A run is a defense with its overrides on one model and one mitigation partition (:class:`RunSpec`,
:class:`ModelFiles`); its result file is up to date when it records the :func:`inputs_fingerprint`
of those inputs' contents. The order of work in :func:`defend` is what keeps the defense honest: the
defense's arguments (a model rebuilt from bare weights, the mitigation images, its hyperparameters,
a device) are built first, the defense runs, and only then are the test set and the backdoor test
set loaded for evaluation. ``bdsweep defend`` (one run) and ``bdsweep defend-model`` (every run of a
model, the workflow's job) are thin command lines over this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .atomic import file_digest, read_json, read_npy, write_json
from .checkpoints import Checkpoint, defense_checkpoints, trace
from .data.store import FILES as DATASET_FILES
from .data.store import PreparedDataset
from .defenses import Defended, MitigationData
from .engine import as_tensor, select_device
from .errors import Preempted, RetryWithLess
from .evaluate import evaluate_model, load_poison, normalisation_of
from .metrics import removal_metrics
from .model_file import load_model
from .params import as_dict, resolve, scale_batch_sizes, stable_hash, stable_seed
from .provenance import device_name, peak_memory, reset_peak_memory, versions
from .registry import DEFENSES
from .results import SCHEMA_VERSION

NON_FINITE = "non-finite weights after defense"



def mitigation_data(data: PreparedDataset, partition: np.ndarray | None, device: torch.device) -> MitigationData:
    """What a defense is given of partition ``partition`` (a partition file's array): its SPC images
    per class in draw order, copied out of the memory map, their labels, and FORK's extra draw as
    ``spare`` (see ``bdsweep.partition``). A flat index array is taken as it is, with no spare."""
    partition = np.zeros(0, dtype=np.int64) if partition is None else np.asarray(partition)
    if partition.ndim == 2:
        return replace(_images_of(data, partition[:, :-1].reshape(-1), device),
                       spare=_images_of(data, partition[:, -1], device))
    return _images_of(data, partition, device)


def _images_of(data: PreparedDataset, indices: np.ndarray, device: torch.device) -> MitigationData:
    images = np.asarray(data.x_train[indices]) if len(indices) else np.zeros((0, *data.x_train.shape[1:]), np.uint8)
    return MitigationData(
        images=as_tensor(images, device),
        labels=as_tensor(np.asarray(data.y_train[indices], dtype=np.int64), device),
        normalisation=normalisation_of(data),
        image_size=data.info.image_size,
        num_classes=data.info.num_classes,
    )


def recordable(value):
    """``value`` (a defense's details) as the run file can hold it: JSON has no NaN or infinity, so a
    non-finite number (e.g. NC's anomaly index where all trigger norms are equal: FORK's division by a
    zero MAD) is written as the string "nan", "inf" or "-inf" instead of failing the run file."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: recordable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [recordable(item) for item in value]
    if isinstance(value, tuple):
        return tuple(recordable(item) for item in value)
    return value


def run_defense(defense, model, data: MitigationData, params, device, checkpoint: Checkpoint | None = None) -> dict:
    """Call the defense; turn exceptions and non-finite weights into a failed status. With a
    checkpoint, the defense saves its phases there and SIGTERM stops it with Preempted (a rerun
    resumes)."""
    reset_peak_memory(device)
    started = time.perf_counter()
    outcome = {"status": "ok", "reason": None, "details": {}, "model": None}
    resumed_from = None
    try:
        with defense_checkpoints(checkpoint) if checkpoint is not None else nullcontext() as session:
            resumed_from = session.resumed_from if session is not None else None
            result = defense.run(model, data, params, device)
        if isinstance(result, Defended):
            result, outcome["details"] = result.model, recordable(result.details)
        if not all(torch.isfinite(t).all() for t in result.state_dict().values() if t.is_floating_point()):
            outcome.update(status="failed", reason=NON_FINITE)
        else:
            outcome["model"] = result
    except (torch.OutOfMemoryError, Preempted):
        raise  # not a result of the defense: the job stops, and its retry resumes or asks for smaller batches
    except Exception as error:  # a defense's failure is a result, recorded with its reason
        outcome.update(status="failed", reason=f"{type(error).__name__}: {error}",
                       details={"traceback": traceback.format_exc(limit=5)})
    # Where an earlier attempt (preempted, killed) left a checkpoint: the trace of a resumed run.
    outcome["resumed"] = resumed_from
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    outcome["wall_time_s"] = time.perf_counter() - started
    outcome.update(peak_memory(device))
    return outcome


@dataclass(frozen=True)
class ModelFiles:
    """What every run on one model reads: the model and its record, the dataset, and the backdoor
    test set (evaluation only: it is opened after the defense has returned)."""

    model: str
    model_metrics: str
    data: str
    backdoor: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """One run: a defense with its configured overrides on one partition (None: no data)."""

    defense: str
    overrides: dict
    coordinates: dict
    partition: str | None
    out: str


def inputs_fingerprint(run: RunSpec, digests: dict, batch_percent: int = 100) -> str:
    """What a run's result depends on: the defense, its overrides, its coordinates, the contents
    of its input files (``digests``: path -> content hash) and, below 100 %, the scale of its batch
    sizes. A run file recording the same fingerprint is up to date."""
    files = {"model": digests["model"], "data": digests["data"], "backdoor": digests.get("backdoor"),
             "partition": digests.get(run.partition)}
    inputs = {"defense": run.defense, "overrides": run.overrides, "coordinates": run.coordinates, "files": files}
    if batch_percent != 100:  # absent at full size, so run files written before this key stay valid
        inputs["batch_percent"] = batch_percent
    return stable_hash(inputs)


# An out-of-memory failure of a run is recorded beside its run file (``<run>.oom``, JSON): the
# batch percentage the run needs and the device it failed on. Only that run starts at reduced
# batch sizes in later jobs; on a device with more memory, or once the file is deleted, it is
# recomputed at full size (its fingerprint includes the percentage).
OOM_MARKER_SUFFIX = ".oom"


def oom_marker(run_out: str | os.PathLike) -> Path:
    return Path(run_out).with_suffix(OOM_MARKER_SUFFIX)


def device_memory(device: torch.device) -> int | None:
    """Total memory of a GPU in bytes; None for the CPU."""
    return int(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else None


def needed_batch_percent(run_out: str | os.PathLike, memory: int | None) -> int:
    """The batch percentage ``run_out``'s marker asks for (100 without one). A marker written on a
    device with less memory than ``memory`` no longer applies: the run is tried at full size."""
    path = oom_marker(run_out)
    try:
        marker = json.loads(path.read_text())
        percent = int(marker["batch_percent"])
    except FileNotFoundError:
        return 100
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"bdsweep: ignoring unreadable out-of-memory marker {path} ({error}); trying full batch sizes",
              file=sys.stderr)
        return 100
    recorded = marker.get("device_memory_bytes")
    if memory is not None and recorded is not None and memory > recorded:
        return 100
    return min(100, max(1, percent))


def record_out_of_memory(run_out: str | os.PathLike, percent: int, device: torch.device, error: str) -> None:
    """Write (atomically) that ``run_out`` needs batch sizes scaled to ``percent``."""
    write_json(oom_marker(run_out), {"batch_percent": percent, "device": device_name(device),
                                     "device_memory_bytes": device_memory(device), "error": error})


def dataset_digest(directory: str | os.PathLike) -> str:
    """Content hash of a prepared dataset: its record and every array a run reads (the mitigation
    images are rows of ``x_train``, the evaluation reads the test arrays), so a dataset prepared
    again with equal bytes reruns nothing and one with other images reruns every run on it."""
    digest = hashlib.sha256()
    for name in DATASET_FILES:
        digest.update(f"{name}:{file_digest(os.path.join(directory, name))};".encode())
    return digest.hexdigest()


def model_digests(files: ModelFiles) -> dict:
    return {"model": file_digest(files.model), "data": dataset_digest(files.data),
            "backdoor": file_digest(files.backdoor)}


def defend(run: RunSpec, files: ModelFiles, device: torch.device, fingerprint: str, batch_percent: int = 100,
           dataset: PreparedDataset | None = None) -> dict:
    """Run ``run`` on the model of ``files`` and write its run file; returns the record written.
    ``fingerprint`` is the run's :func:`inputs_fingerprint`. Raises RetryWithLess (no run file)
    when the device runs out of memory, Preempted (no run file; the checkpoint beside it holds the
    defense's progress) on SIGTERM."""
    defense = DEFENSES.get(run.defense)
    params = resolve(defense.params, run.overrides, f"defense {run.defense!r}")
    if batch_percent < 100:
        params = scale_batch_sizes(params, batch_percent)
    if defense.needs_data and not run.partition:
        raise ValueError(f"defense {run.defense!r} needs mitigation data: pass --partition")

    # 1. Only what the defense may see.
    model, _ = load_model(files.model)
    data = dataset if dataset is not None else PreparedDataset(files.data)
    indices = read_npy(run.partition, "partition") if defense.needs_data else None
    torch.manual_seed(stable_seed("defend", run.defense, json.dumps(run.coordinates, sort_keys=True)))
    # Tied to the run's inputs and to the batch sizes, which a retry after out of memory changes.
    checkpoint = Checkpoint(Path(run.out).with_suffix(".ckpt"), stable_hash([fingerprint, batch_percent]))
    try:
        outcome = run_defense(defense, model.to(device), mitigation_data(data, indices, device), params, device,
                              checkpoint)
    except torch.OutOfMemoryError as error:
        raise RetryWithLess(f"defense {run.defense!r} ran out of device memory at {batch_percent} % of its batch "
                            f"sizes ({error}); no run file written for {run.out}") from None
    if batch_percent < 100:
        outcome["details"].setdefault("notes", []).append(
            f"batch sizes scaled to {batch_percent} % after running out of device memory")

    # 2. Evaluation data, after the defense has returned.
    model_record = read_json(files.model_metrics)
    pre = model_record["metrics"]
    post = removal = None
    if outcome["model"] is not None:
        backdoor = load_poison(files.backdoor) if files.backdoor else None
        post = evaluate_model(outcome["model"], data, backdoor, model_record["target"], device)
        removal = removal_metrics(pre, post)

    hyperparameters = as_dict(params)
    record = {
        "schema_version": SCHEMA_VERSION,
        **run.coordinates,
        "defense": run.defense,
        "family": defense.family,
        "featured": defense.featured,
        "attack_type": model_record.get("attack_type"),  # static/dynamic trigger, from the model's record
        "target": model_record["target"],
        "effective_ratio": model_record["effective_ratio"],
        "hyperparameters": hyperparameters,
        "hyperparameter_hash": stable_hash(hyperparameters),
        "pre": pre,
        "post": post,
        "removal": removal,
        "status": outcome["status"],
        "reason": outcome["reason"],
        "details": outcome["details"],
        "wall_time_s": outcome["wall_time_s"],
        "peak_memory_bytes": outcome["peak_memory_bytes"],
        "peak_memory_kind": outcome["peak_memory_kind"],
        "device": device_name(device),
        "batch_percent": batch_percent,
        "resumed": outcome["resumed"],
        "model_sanity": model_record["sanity"],
        "versions": versions(),
        "inputs_fingerprint": fingerprint,
    }
    write_json(run.out, record)
    checkpoint.remove()  # the run file is written: the checkpoint has served its purpose
    return record


# Halvings of one run's batch sizes tried inside the job before it gives up with exit 75; each is
# recorded beside the run file (``<run>.oom``), so the rule's retry (the same command) goes on
# from there for that run only.
IN_JOB_HALVINGS = 2


def up_to_date(run: RunSpec, fingerprint: str) -> bool:
    """Whether ``run``'s file exists and records ``fingerprint``. Contents decide, not modification
    times: an input rewritten with equal bytes (a partition redrawn, a model retrained
    deterministically) leaves its runs up to date; one with other bytes changes the fingerprint."""
    try:
        with open(run.out) as handle:
            return json.load(handle).get("inputs_fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):  # missing, unreadable, or not a run record
        return False


def run_with_retries(run: RunSpec, digests: dict, files: ModelFiles, device: str, batch_percent: int,
                     dataset=None) -> dict:
    """One run, at ``batch_percent`` of its batch sizes (what its out-of-memory marker asks for).
    Out of device memory, it records half that beside the run file and tries again (twice) before
    giving up; a run that passes at full size clears its marker."""
    device = select_device(device)
    percent = batch_percent
    for halving in range(IN_JOB_HALVINGS + 1):
        fingerprint = inputs_fingerprint(run, digests, percent)
        try:
            record = defend(run, files, device, fingerprint, percent, dataset)
        except RetryWithLess as error:
            if percent == 1:
                raise
            percent = max(1, percent // 2)
            record_out_of_memory(run.out, percent, device, str(error))
            if halving == IN_JOB_HALVINGS:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            trace(f"{run.out}: out of device memory; retrying at {percent} % of the batch sizes")
            continue
        if percent == 100:
            oom_marker(run.out).unlink(missing_ok=True)  # the cause is gone (a larger device)
        return {"status": record["status"], "batch_percent": percent, "fingerprint": fingerprint}
    raise AssertionError("unreachable")
