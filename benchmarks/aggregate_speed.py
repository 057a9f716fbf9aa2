"""How fast the aggregate stage builds the results table at the full grid's size.

Writes N synthetic run files shaped like the defend stage's (every field, realistic
hyperparameter and detail dictionaries) and times, side by side:

- reference: a straightforward build (json.load every file, pandas.json_normalize, Parquet);
- cold: ``bdsweep.results.aggregate`` with an empty cache (the first aggregation);
- no-op: the same again, nothing changed (a rerun after the last defense finished);
- 1 % changed: a rerun after 1 % of the runs were redone.

    python benchmarks/aggregate_speed.py --runs 122236
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bdsweep.results import SCHEMA_VERSION, aggregate

DEFENSES = ("none", "fp", "bnp", "clp", "anp", "awm", "rnp", "mm-bd", "npd", "ft", "fst", "ft-sam", "nad", "nc", "pbe",
            "i-bau", "sau")


def synthetic_record(i: int, rng: np.random.Generator) -> dict:
    pre = {"acc": float(rng.uniform(0.8, 0.95)), "asr": float(rng.uniform(0.8, 1)), "ra": float(rng.uniform(0, 0.1))}
    post = {"acc": pre["acc"] - float(rng.uniform(0, 0.2)), "asr": float(rng.uniform()), "ra": float(rng.uniform())}
    return {
        "schema_version": SCHEMA_VERSION, "dataset": ("cifar10", "gtsrb", "tiny")[i % 3],
        "architecture": ("preact_resnet18", "vgg19_bn", "efficientnet_b3", "mobilenet_v3_large")[i // 3 % 4],
        "attack": ("badnets", "blended", "sig", "lf", "ssba", "iab", "wanet", "bpp")[i // 12 % 8],
        "ratio": (0.01, 0.05, 0.1)[i // 96 % 3], "spc": (2, 10, 100)[i // 288 % 3], "seed": i // 864 % 10,
        "defense": DEFENSES[i % len(DEFENSES)], "family": "pruning", "target": 0, "effective_ratio": 0.1,
        "hyperparameters": {"epochs": 20, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128,
                            "alpha": 0.2, "schedule": "cosine", "augment": True, "milestones": [10, 20]},
        "hyperparameter_hash": f"{i:012x}", "pre": pre, "post": post,
        "removal": {"arr": (pre["acc"] - post["acc"]) / pre["acc"], "rdr": (pre["acc"] - post["ra"]) / pre["acc"]},
        "status": "ok", "reason": None,
        "details": {"pruned_channels": int(rng.integers(0, 512)), "threshold": 0.35, "held_out_accuracy": 0.9,
                    "notes": ["fewer images than a batch: one batch per epoch"]},
        "wall_time_s": float(rng.uniform(1, 300)), "peak_memory_bytes": int(rng.integers(1e9, 8e9)),
        "peak_memory_kind": "cuda_max_allocated", "device": "NVIDIA H100 80GB HBM3",
        "model_sanity": {"acc_below_gate": False, "asr_below_gate": False},
        "versions": {"python": "3.11.9", "torch": "2.15.0", "torchvision": "0.29.2", "numpy": "2.4.6",
                     "bdsweep": "0.1"},
    }


def write_runs(root: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = root / f"{i // 1000:04d}" / f"run{i}.json"
        if i % 1000 == 0:
            path.parent.mkdir(parents=True)
        path.write_text(json.dumps(synthetic_record(i, rng), indent=1, sort_keys=True))
        paths.append(path)
    return paths


def reference_build(paths: list[Path], out: Path) -> None:
    records = []
    for path in paths:
        with open(path) as handle:
            records.append(json.load(handle))
    table = pd.json_normalize(records)
    for column in ("hyperparameters", "details", "versions"):  # as JSON text, like ours
        table = table.drop(columns=[c for c in table.columns if c.startswith(column + ".")])
    table["details"] = [json.dumps(r["details"], sort_keys=True) for r in records]
    table.to_parquet(out, index=False)


def timed(label: str, call) -> float:
    started = time.perf_counter()
    call()
    seconds = time.perf_counter() - started
    print(f"{label:<34} {seconds:7.1f} s", flush=True)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=122_236)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        paths = write_runs(root / "runs", args.runs)
        print(f"wrote {len(paths):,} run files in {time.perf_counter() - started:.1f} s "
              f"({sum(os.path.getsize(p) for p in paths[:1000]) / 1000:.0f} bytes each)")
        cache, table, log = root / "cache.parquet", root / "table.parquet", root / "log"
        reference = timed("reference (json_normalize)", lambda: reference_build(paths, root / "reference.parquet"))
        cold = timed("aggregate, cold cache", lambda: aggregate(paths, table, log, cache))
        noop = timed("aggregate, nothing changed", lambda: aggregate(paths, table, log, cache))
        rng = np.random.default_rng(1)
        for index in rng.choice(len(paths), size=len(paths) // 100, replace=False):
            paths[index].write_text(json.dumps(synthetic_record(int(index), rng)))
        changed = timed("aggregate, 1 % of the runs changed", lambda: aggregate(paths, table, log, cache))
        print(f"rows: {len(pd.read_parquet(table)):,}; ratios to the reference: cold {reference / cold:.2f}x, "
              f"no-op {reference / noop:.1f}x, 1 % changed {reference / changed:.1f}x")


if __name__ == "__main__":
    main()
