"""One model's defense runs: one process per run (what a per-run Snakemake job costs) against the
model-level job (`bdsweep defend-model`), which starts Python and torch once, reads the model and
dataset once per worker, and runs ``--workers`` runs at once.

    python benchmarks/model_job_speed.py [--seeds 3] [--workers 2]

Builds a small backdoored model first (digits at 16 px, BadNets, a small CNN; about a minute on a
CPU), then times both ways over the same runs (none and CLP once; FT for 2 epochs on every
partition) and checks that they give the same results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "workflow"), "OMP_NUM_THREADS": "1"}


def bdsweep(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "bdsweep", *args], check=True, env=ENV, stdout=subprocess.DEVNULL)


def build_model(root: Path, seeds: int) -> None:
    data, pool = root / "data", root / "pool.npy"
    bdsweep("prepare", "--name", "digits", "--options", '{"source": "digits", "image_size": 16}', "--out", str(data))
    bdsweep("pool", "--data", str(data), "--per-class", "20", "--seed", "0", "--out", str(pool))
    bdsweep("resource", "--data", str(data), "--attack", "badnets", "--out", str(root / "badnets.npz"))
    bdsweep("poison", "--data", str(data), "--pool", str(pool), "--resource", str(root / "badnets.npz"),
            "--attack", "badnets", "--ratio", "0.1", "--target", "0", "--seed", "0", "--out", str(root / "poison.npz"))
    bdsweep("train", "--data", str(data), "--attack", "badnets", "--poison", str(root / "poison.npz"),
            "--architecture", "small_cnn", "--recipe", '{"epochs": 6, "batch_size": 64, "lr": 0.05}', "--target", "0",
            "--seed", "0", "--device", "cpu", "--out-model", str(root / "model.pt"),
            "--out-metrics", str(root / "metrics.json"), "--out-curve", str(root / "curve.csv"))
    for spc in (2, 10):
        for seed in range(seeds):
            bdsweep("partition", "--data", str(data), "--pool", str(pool), "--spc", str(spc), "--seed", str(seed),
                    "--out", str(root / f"spc{spc}-seed{seed}.npy"))


def plan(seeds: int) -> dict:
    tokens = [f"spc{spc}-seed{seed}" for spc in (2, 10) for seed in range(seeds)]
    return {"none": {"params": {}, "mitigations": ["nodata"]}, "clp": {"params": {}, "mitigations": ["nodata"]},
            "ft": {"params": {"epochs": 2, "batch_size": 32}, "mitigations": tokens}}


def model_arguments(root: Path) -> list[str]:
    return ["--model", str(root / "model.pt"), "--model-metrics", str(root / "metrics.json"), "--data",
            str(root / "data"), "--backdoor", str(root / "poison.npz"), "--device", "cpu"]


def one_process_per_run(root: Path, runs: dict, out: Path) -> float:
    started = time.perf_counter()
    for defense, entry in runs.items():
        for token in entry["mitigations"]:
            spc, seed = (None, None) if token == "nodata" else map(int, token[3:].split("-seed"))
            partition = [] if token == "nodata" else ["--partition", str(root / f"{token}.npy")]
            bdsweep("defend", *model_arguments(root), *partition, "--defense", defense,
                    "--params", json.dumps(entry["params"]), "--out", str(out / defense / f"{token}.json"),
                    "--coordinates", json.dumps({"dataset": "digits", "ratio": 0.1, "spc": spc, "seed": seed}))
    return time.perf_counter() - started


def model_job(root: Path, runs: dict, out: Path, workers: int) -> float:
    started = time.perf_counter()
    bdsweep("defend-model", *model_arguments(root), "--defenses", json.dumps(runs),
            "--coordinates", json.dumps({"dataset": "digits", "ratio": 0.1}),
            "--partitions", str(root / "spc{spc}-seed{seed}.npy"),
            "--runs", str(out / "{defense}" / "{mitigation}.json"), "--workers", str(workers),
            "--out", str(out / "manifest.json"))
    return time.perf_counter() - started


def results(out: Path) -> dict:
    return {str(path.relative_to(out)): json.loads(path.read_text())["post"] for path in out.glob("*/*.json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="partition seeds (FT runs = 2 SPC x seeds)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bdsweep-model-job-") as scratch:
        root = Path(scratch)
        build_model(root, args.seeds)
        runs = plan(args.seeds)
        count = sum(len(entry["mitigations"]) for entry in runs.values())
        reference = one_process_per_run(root, runs, root / "per-run")
        sequential = model_job(root, runs, root / "job-1", 1)
        parallel = model_job(root, runs, root / f"job-{args.workers}", args.workers)
        expected = results(root / "per-run")
        for name in ("job-1", f"job-{args.workers}"):
            if results(root / name) != expected:
                sys.exit(f"{name} gave other results than one process per run")
    print(f"{count} runs of one model (none, CLP, FT 2 epochs x {count - 2} partitions), small CNN, 16 px, CPU")
    print(f"one process per run:          {reference:6.1f} s")
    print(f"model job, 1 worker:          {sequential:6.1f} s  ({reference / sequential:.1f}x)")
    print(f"model job, {args.workers} workers:         {parallel:6.1f} s  ({reference / parallel:.1f}x)")


if __name__ == "__main__":
    main()
