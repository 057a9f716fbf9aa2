"""Every defense run of one model, in one job: the second level of the workflow.

The top-level DAG has one job per model (a few hundred for the paper's grid, so it plans in seconds);
this job is a small make of its own over the model's runs. Each run is still its own result file,
and a run file is up to date when it records the fingerprint of what the run depends on (defense,
overrides, coordinates, the contents of the model, dataset, partition and backdoor test set, and
the scale of its batch sizes after running out of memory, see ``runs.OOM_MARKER_SUFFIX``):
a rerun after an interruption, a new seed, a new defense or one changed hyperparameter computes
only the runs whose files are missing or stale. The model, dataset and backdoor test set are read
once per worker instead of once per run, and ``--workers`` runs share one device.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

import torch

from ..atomic import write_json
from ..errors import Preempted
from ..layout import parse_mitigation
from ..runs import (
    ModelFiles,
    RunSpec,
    device_memory,
    file_digest,
    inputs_fingerprint,
    model_digests,
    needed_batch_percent,
    oom_marker,
    run_with_retries,
    up_to_date,
)


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="the model file")
    parser.add_argument("--model-metrics", required=True, help="the model's pre-defense metrics file")
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--backdoor", help="the backdoor test set; omit for a clean model")
    parser.add_argument("--defenses", required=True, type=json.loads,
                        help='JSON: {defense: {"params": {...}, "mitigations": ["nodata" | "spcS-seedK", ...]}}')
    parser.add_argument("--coordinates", required=True, type=json.loads, help="the model's grid coordinates")
    parser.add_argument("--partitions", required=True, help="partition path pattern with {spc} and {seed}")
    parser.add_argument("--runs", required=True, help="run file path pattern with {defense} and {mitigation}")
    parser.add_argument("--workers", type=int, default=1, help="runs at once (each one torch thread)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                        help="bf16 autocast on CUDA, or fp32 as the survey's toolkit (engine.precision)")
    parser.add_argument("--out", required=True, help="the manifest: every run file of the model and its status")


def plan_runs(args) -> list[RunSpec]:
    runs = []
    for defense, entry in args.defenses.items():
        for token in entry["mitigations"]:
            spc, seed = parse_mitigation(token)
            runs.append(RunSpec(
                defense=defense,
                overrides=entry.get("params", {}),
                coordinates={**args.coordinates, "spc": spc, "seed": seed},
                partition=None if spc is None else args.partitions.format(spc=spc, seed=seed),
                out=args.runs.format(defense=defense, mitigation=token),
            ))
    return runs


_worker_state: dict = {}


def _start_worker(files: ModelFiles, device: str, threads: int | None = None, precision: str = "bf16") -> None:
    """What a worker keeps between runs: the files, the device, the precision and (once opened) the dataset."""
    if threads is not None:
        torch.set_num_threads(threads)
    _worker_state.clear()
    _worker_state.update(files=files, device=device, precision=precision)


def _run_in_worker(run: RunSpec, digests: dict, batch_percent: int) -> dict:
    from ..engine import precision

    state = _worker_state
    if "dataset" not in state:
        from ..data.store import PreparedDataset

        state["dataset"] = PreparedDataset(state["files"].data)
    with precision(state["precision"]):
        return run_with_retries(run, digests, state["files"], state["device"], batch_percent, state["dataset"])


def run_all(pending: list[tuple[RunSpec, int]], digests: dict, files: ModelFiles, args) -> dict[str, dict]:
    """Run ``pending`` (run, batch percent) pairs, ``args.workers`` at a time; returns outcomes by run file."""
    if args.workers <= 1 or len(pending) <= 1:
        _start_worker(files, args.device, precision=args.precision)
        outcomes = {}
        for run, percent in pending:
            outcomes[run.out] = _run_in_worker(run, digests, percent)
            print(f"{run.out}: {outcomes[run.out]['status']}", flush=True)
        return outcomes

    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    stop_requested = []

    def forward_sigterm(signum, frame):  # preemption: every worker checkpoints its run and stops
        stop_requested.append(signum)
        for child in context.active_children():
            os.kill(child.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_start_worker,
                                 initargs=(files, args.device, 1, args.precision)) as pool:  # one thread per run
            futures = {pool.submit(_run_in_worker, run, digests, percent): run for run, percent in pending}
            done, not_done = wait(futures, return_when=FIRST_EXCEPTION)
            for future in not_done:
                future.cancel()
            outcomes = {}
            for future in done:
                if future.exception() is None:
                    outcomes[futures[future].out] = future.result()
                    print(f"{futures[future].out}: {future.result()['status']}", flush=True)
            failed = [future for future in done if future.exception() is not None]
            if stop_requested:
                raise Preempted(f"stopped by SIGTERM with {len(outcomes)} of {len(pending)} runs done; "
                                "the rerun resumes")
            if failed:
                raise failed[0].exception()
            return outcomes
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(args):
    from ..engine import select_device

    started = time.perf_counter()
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    files = ModelFiles(args.model, args.model_metrics, args.data, args.backdoor)
    runs = plan_runs(args)
    digests = model_digests(files)
    digests.update({path: file_digest(path) for path in {run.partition for run in runs if run.partition}})
    # The device's memory decides whether a marker still applies; asked only where one exists.
    memory = device_memory(select_device(args.device)) if any(oom_marker(run.out).exists() for run in runs) else None
    percents = {run.out: needed_batch_percent(run.out, memory) for run in runs}
    fingerprints = {run.out: inputs_fingerprint(run, digests, percents[run.out]) for run in runs}
    pending = [(run, percents[run.out]) for run in runs if not up_to_date(run, fingerprints[run.out])]
    reduced = sum(percent < 100 for _, percent in pending)
    print(f"{len(runs)} runs: {len(runs) - len(pending)} up to date, {len(pending)} to compute"
          + (f" ({reduced} at reduced batch sizes after running out of memory before)" if reduced else ""),
          flush=True)
    outcomes = run_all(pending, digests, files, args)
    for path, outcome in outcomes.items():
        percents[path], fingerprints[path] = outcome["batch_percent"], outcome["fingerprint"]
    write_json(args.out, {
        "coordinates": args.coordinates,
        "runs": [{"defense": run.defense, "mitigation": os.path.splitext(os.path.basename(run.out))[0],
                  "path": run.out, "fingerprint": fingerprints[run.out], "batch_percent": percents[run.out],
                  "computed": run.out in outcomes}
                 for run in runs],
        "computed": len(outcomes),
        "reused": len(runs) - len(outcomes),
        "wall_time_s": time.perf_counter() - started,
    })
    print(f"{len(outcomes)} computed, {len(runs) - len(outcomes)} reused in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
