"""Are two results tables the same science? Compares two ``runs.parquet`` files (e.g. the demo's
before and after a refactoring) row by row, ignoring what legitimately differs between two
computations of the same runs: wall time, peak memory, device, library versions, file paths,
whether a run was resumed, and the inputs fingerprint (a hash of the input files' bytes, and a
model file records the versions it was trained with).

    python benchmarks/compare_results.py OLD/results/table/runs.parquet NEW/results/table/runs.parquet

Prints, per column, how many runs differ, and exits 1 if any compared column differs. Metrics are
compared exactly by default (the demo is bit-reproducible on one CPU with one thread per job);
``--tolerance 1e-6`` allows float noise, e.g. between machines with other instruction sets.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

# Differ between two computations of the same run without changing its result.
IGNORED = {"wall_time_s", "peak_memory_bytes", "peak_memory_kind", "device", "versions", "path",
           "inputs_fingerprint", "resumed"}
KEY = ["dataset", "architecture", "attack", "ratio", "defense", "spc", "seed"]


def differing(old: pd.Series, new: pd.Series, tolerance: float) -> pd.Series:
    """Row mask where ``old`` and ``new`` differ (NaN equals NaN)."""
    if pd.api.types.is_float_dtype(old) and pd.api.types.is_float_dtype(new):
        both_nan = old.isna() & new.isna()
        return ~(both_nan | np.isclose(old, new, rtol=0, atol=tolerance))
    return ~((old == new) | (old.isna() & new.isna()))


def compare(old: pd.DataFrame, new: pd.DataFrame, tolerance: float) -> dict[str, int]:
    key = [column for column in KEY if column in old.columns and column in new.columns]
    if set(map(tuple, old[key].astype(str).values)) != set(map(tuple, new[key].astype(str).values)):
        only_old = len(old.merge(new[key], on=key, how="left", indicator=True).query("_merge == 'left_only'"))
        only_new = len(new.merge(old[key], on=key, how="left", indicator=True).query("_merge == 'left_only'"))
        return {"(runs only in OLD)": only_old, "(runs only in NEW)": only_new}
    merged = old.merge(new, on=key, suffixes=("_old", "_new"))
    columns = sorted((set(old.columns) & set(new.columns)) - set(key) - IGNORED)
    counts = {column: int(differing(merged[f"{column}_old"], merged[f"{column}_new"], tolerance).sum())
              for column in columns}
    for column in sorted(set(old.columns) ^ set(new.columns)):
        counts[f"(column only in {'OLD' if column in old.columns else 'NEW'}: {column})"] = len(merged)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--tolerance", type=float, default=0.0)
    args = parser.parse_args()
    old, new = pd.read_parquet(args.old), pd.read_parquet(args.new)
    counts = compare(old, new, args.tolerance)
    print(f"{len(old)} runs in OLD, {len(new)} in NEW; ignored: {', '.join(sorted(IGNORED))}")
    for column, count in counts.items():
        print(f"  {column:<40} {'equal' if count == 0 else f'{count} runs differ'}")
    return int(any(counts.values()))


if __name__ == "__main__":
    sys.exit(main())
